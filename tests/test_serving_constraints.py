"""Serving constraints in the search space (issue 23, item 4): ``--count-multiple M`` makes every layer keep a
multiple of M experts (the expert-parallel size of the server), ``--allowed-counts LIST`` one of a list of counts
(what a kernel accepts: not a lattice), for every optimizer and baseline; a hand-written plan that breaks either is
refused in one line before anything loads."""
from __future__ import annotations

import itertools
import json

import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.pipeline import run_search
from allocopt.plan import Plan
from allocopt.search.optimizers import available_optimizers
from allocopt.search.space import make_space
from reliability_kit import TEXT, save_tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """olmoe with 16 experts, top-2, 3 layers: with --count-multiple 4 a layer keeps 4, 8, 12 or 16."""
    root = tmp_path_factory.mktemp("multiple")
    save_tiny_model(root / "model", family="olmoe", seed=4, num_experts=16)
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    return root


def _config(root, tmp_path, optimizer: str, **extra) -> RunConfig:
    return RunConfig.from_sources(None, {
        "model": str(root / "model"), "data": str(root / "data.txt"), "seq_len": 16, "search_num_seqs": 2,
        "calib_num_seqs": 2, "evals": 8, "population": 4, "sparsity": 0.4, "optimizer": optimizer, "device": "cpu",
        "out": str(tmp_path / "run"), "run_name": "m", "count_multiple": 4, **extra})


ALLOWED = [6, 10, 16]      # 3 layers: reachable totals 18, 22, 26, 28, 30, 32, ...; 0.4 of 48 removed asks for 29 -> 28


def _trial_allocations(config) -> list[list[int]]:
    study = optuna.load_study(study_name="m", storage=config.storage_url)
    return [t.user_attrs["allocation"] for t in study.get_trials(deepcopy=False) if "allocation" in t.user_attrs]


@pytest.mark.parametrize("optimizer", available_optimizers())
def test_every_optimizer_and_baseline_keeps_multiples(root, tmp_path, optimizer):
    config = _config(root, tmp_path, optimizer)
    result = run_search(config, progress=False)
    plan = Plan.load(result.plan_path)
    assert sum(plan.counts) == 28 and all(c % 4 == 0 for c in plan.counts)     # 0.4 of 48 removed: 19.2 -> 20
    assert plan.extra["count_multiple"] == 4
    allocations = _trial_allocations(config)
    assert allocations and all(c % 4 == 0 for a in allocations for c in a)


@pytest.mark.parametrize("optimizer", available_optimizers())
def test_every_optimizer_and_baseline_keeps_allowed_counts(root, tmp_path, optimizer):
    """Every plan evaluated (probes off the budget too), recorded and written keeps 6, 10 or 16 experts per layer,
    and the budget is the reachable total nearest the one asked for."""
    config = _config(root, tmp_path, optimizer, count_multiple=1, allowed_counts=ALLOWED)
    result = run_search(config, progress=False)
    plan = Plan.load(result.plan_path)
    assert sum(plan.counts) == 28 and set(plan.counts) <= set(ALLOWED), plan.counts
    assert plan.extra["allowed_counts"] == ALLOWED
    allocations = _trial_allocations(config)
    assert allocations and all(c in ALLOWED for a in allocations for c in a), allocations


def test_snapping_finds_the_nearest_allowed_plan_on_the_budget():
    """The decoder every optimizer's points go through: brute force over all allowed plans agrees with its DP."""
    rng = np.random.default_rng(0)
    layers = 4
    space = make_space({l: 16 for l in range(layers)}, {l: 2 for l in range(layers)}, {l: 1 for l in range(layers)},
                       keep=34, allowed_counts=[3, 5, 8, 12, 16])
    plans = [p for p in itertools.product(*(space.levels(i) for i in range(layers))) if sum(p) == space.budget]
    for _ in range(50):
        x = rng.multinomial(space.budget, np.full(layers, 1 / layers))
        if x.sum() != space.budget:
            continue
        snapped = space.snap(x)
        best = min(int(np.abs(np.array(p) - x).sum()) for p in plans)
        assert space.contains(snapped) and int(np.abs(snapped - x).sum()) == best
    off = space.snap(np.array([4, 4, 4, 4]))                 # a probe off the budget: each layer to its nearest count
    assert off.tolist() == [3, 3, 3, 3] or off.tolist() == [5, 5, 5, 5]


def test_allowed_counts_combine_with_group_limited_routing(tmp_path):
    """deepseek_v3 with 4 groups: allowed counts that are not multiples of the group count are never used."""
    save_tiny_model(tmp_path / "model", family="deepseek_v3", seed=2, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4)
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = run_search(_config(tmp_path, tmp_path, "ga", count_multiple=1, allowed_counts=[4, 8, 10, 12, 16],
                                sparsity=0.5), progress=False)
    assert set(Plan.load(result.plan_path).counts) <= {4, 8, 12, 16}


@pytest.mark.parametrize("counts, message", [
    ([0, 8], "allowed counts must be positive expert counts"),
    ([1], "no allowed count lies there"),                      # top-2 needs at least 2 in every layer
    ([16], "pruning nothing"),                                 # the only reachable total is the unpruned model
])
def test_impossible_allowed_counts_are_refused_in_one_line(root, tmp_path, counts, message):
    with pytest.raises(AllocoptError, match=message):
        run_search(_config(root, tmp_path, "uniform", count_multiple=1, allowed_counts=counts), progress=False)
    result = CliRunner().invoke(cli, ["run", "--model", str(root / "model"), "--data", str(root / "data.txt"),
                                      "--allowed-counts", "8,x", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "are not whole numbers" in result.output and not (tmp_path / "cli").exists()


def test_the_multiple_combines_with_group_limited_routing(tmp_path):
    """deepseek_v3 with 4 groups and --count-multiple 8: every count is a multiple of both (lcm 8)."""
    save_tiny_model(tmp_path / "model", family="deepseek_v3", seed=2, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4)
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = run_search(_config(tmp_path, tmp_path, "ga", count_multiple=8, sparsity=0.5), progress=False)
    assert np.all(np.asarray(Plan.load(result.plan_path).counts) % 8 == 0)


@pytest.mark.parametrize("constraint, flag, message", [
    ({}, ["--count-multiple", "4"], "not a multiple of --count-multiple 4"),
    ({"count_multiple": 1, "allowed_counts": ALLOWED}, ["--allowed-counts", "6,10,16"], "not one of --allowed-counts 6,10,16"),
])
def test_a_plan_that_breaks_the_constraint_is_refused_in_one_line_before_loading(root, tmp_path, constraint, flag, message):
    config = _config(root, tmp_path, "uniform", **constraint)
    plan_path = run_search(config, progress=False).plan_path
    edited = json.loads(plan_path.read_text())
    layer = edited["layers"][0]
    layer["kept"] = layer["kept"][:-1] + [e for e in range(16) if e not in layer["kept"]][:2]   # one more expert
    edited["counts"][0] = len(layer["kept"])                   # its summary kept in step, as the refusal otherwise asks
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    for extra in ([], flag):            # the plan's own constraint, or the one asked for
        result = CliRunner().invoke(cli, ["prune", "--plan", str(bad), "--out", str(tmp_path / "out"), *extra])
        assert result.exit_code == 2 and not (tmp_path / "out").exists()
        lines = [l for l in result.output.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], result.output
    good = CliRunner().invoke(cli, ["prune", "--plan", str(plan_path), "--out", str(tmp_path / "ok"), *flag])
    assert good.exit_code == 0, good.output


def test_a_multiple_below_one_is_refused():
    with pytest.raises(AllocoptError, match=r"--count-multiple \(count_multiple\) must be >= 1"):
        RunConfig.from_sources(None, {"count_multiple": 0})
