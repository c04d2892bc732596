"""Group-limited routing as a constraint of the allocation space (issue 11): whatever the optimizer, every plan
it evaluates and the plan it writes keep equal experts in every group, at least what the router's group score
reads; the space is searched in units of n_group experts."""
from __future__ import annotations

import numpy as np
import optuna
import pytest

from allocopt.config import RunConfig
from allocopt.models import describe
from allocopt.runtime import load_model
from allocopt.plan import Plan, kept_problem
from allocopt.search.optimizers import available_optimizers
from allocopt.pipeline import run_search
from allocopt.search.space import make_space
from reliability_kit import TEXT, save_tiny_model


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """deepseek_v3 with 16 experts in 4 groups, 2 kept per token, top-4: a layer keeps a multiple of 4, >= 8."""
    root = tmp_path_factory.mktemp("groups")
    save_tiny_model(root / "model", family="deepseek_v3", seed=2, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4)
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    return root


def test_space_counts_in_units_of_groups(grouped):
    info = describe(load_model(grouped / "model", device="cpu")[0])
    assert {l.groups for l in info.layers} == {4} and {l.min_kept for l in info.layers} == {8}   # top-2 sum per group
    space = make_space(info.num_experts, info.top_k, info.bytes_per_expert, sparsity=0.3, min_kept=info.min_kept,
                       unit=info.unit)
    assert space.budget == 24 and space.budget % 4 == 0                 # 22.4 kept rounds to a whole unit
    lattice = space.lattice()
    assert lattice.budget == 6 and lattice.lower.tolist() == [2, 2] and lattice.upper.tolist() == [4, 4]
    assert space.expand(lattice.uniform()).tolist() == space.uniform().tolist() == [12, 12]


@pytest.mark.parametrize("optimizer", available_optimizers())
def test_every_optimizer_keeps_groups_balanced(grouped, tmp_path, optimizer):
    config = RunConfig.from_sources(None, {
        "model": str(grouped / "model"), "data": str(grouped / "data.txt"), "seq_len": 16, "search_num_seqs": 2,
        "calib_num_seqs": 2, "evals": 8, "population": 4, "sparsity": 0.3, "optimizer": optimizer, "device": "cpu",
        "out": str(tmp_path / "run"), "run_name": "g"})
    result = run_search(config, progress=False)
    model, _ = load_model(grouped / "model", device="cpu")
    info = describe(model)
    plan = Plan.load(result.plan_path).validate_for(info)              # would name the rule if a group were off
    assert sum(plan.counts) == 24
    study = optuna.load_study(study_name="g", storage=config.storage_url)
    allocations = [t.user_attrs["allocation"] for t in study.get_trials(deepcopy=False) if "allocation" in t.user_attrs]
    assert allocations and all(c % 4 == 0 and c >= 8 for a in allocations for c in a)
    for t in study.get_trials(deepcopy=False):
        for layer, ids in t.user_attrs.get("kept", {}).items():
            assert kept_problem(info.layers[[l.index for l in info.layers].index(int(layer))], ids) is None
    assert np.all(np.asarray(plan.counts) % 4 == 0)
