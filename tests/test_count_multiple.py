"""Serving constraints in the search space (issue 23, item 4, first half): ``--count-multiple M`` makes every layer
keep a multiple of M experts (the expert-parallel size of the server, or what its kernel accepts), for every
optimizer and baseline; a hand-written plan that breaks it is refused in one line before anything loads."""
from __future__ import annotations

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


@pytest.mark.parametrize("optimizer", available_optimizers())
def test_every_optimizer_and_baseline_keeps_multiples(root, tmp_path, optimizer):
    config = _config(root, tmp_path, optimizer)
    result = run_search(config, progress=False)
    plan = Plan.load(result.plan_path)
    assert sum(plan.counts) == 28 and all(c % 4 == 0 for c in plan.counts)     # 0.4 of 48 removed: 19.2 -> 20
    assert plan.extra["count_multiple"] == 4
    study = optuna.load_study(study_name="m", storage=config.storage_url)
    allocations = [t.user_attrs["allocation"] for t in study.get_trials(deepcopy=False) if "allocation" in t.user_attrs]
    assert allocations and all(c % 4 == 0 for a in allocations for c in a)


def test_the_multiple_combines_with_group_limited_routing(tmp_path):
    """deepseek_v3 with 4 groups and --count-multiple 8: every count is a multiple of both (lcm 8)."""
    save_tiny_model(tmp_path / "model", family="deepseek_v3", seed=2, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4)
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = run_search(_config(tmp_path, tmp_path, "ga", count_multiple=8, sparsity=0.5), progress=False)
    assert np.all(np.asarray(Plan.load(result.plan_path).counts) % 8 == 0)


def test_a_plan_that_breaks_the_multiple_is_refused_in_one_line_before_loading(root, tmp_path):
    config = _config(root, tmp_path, "uniform")
    plan_path = run_search(config, progress=False).plan_path
    edited = json.loads(plan_path.read_text())
    layer = edited["layers"][0]
    layer["kept"] = layer["kept"][:-1] + [e for e in range(16) if e not in layer["kept"]][:2]   # one more: 4k+1
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    for extra in ([], ["--count-multiple", "4"]):            # the plan's own multiple, or the one asked for
        result = CliRunner().invoke(cli, ["prune", "--plan", str(bad), "--out", str(tmp_path / "out"), *extra])
        assert result.exit_code == 2 and not (tmp_path / "out").exists()
        lines = [l for l in result.output.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "not a multiple of --count-multiple 4" in lines[0], result.output
    good = CliRunner().invoke(cli, ["prune", "--plan", str(plan_path), "--out", str(tmp_path / "ok"), "--count-multiple", "2"])
    assert good.exit_code == 0, good.output


def test_a_multiple_below_one_is_refused():
    with pytest.raises(AllocoptError, match="count_multiple must be >= 1"):
        RunConfig.from_sources(None, {"count_multiple": 0})
