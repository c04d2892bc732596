"""A budget in bytes (issue 23, item 1): ``--memory SIZE`` / ``--memory-ratio R`` bound the pruned export's tensor
bytes, counted by the code that writes the export, so what lands on disk is what the budget counted."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.export.size import ExportSize, export_size
from allocopt.models import describe
from allocopt.pipeline import run_search
from allocopt.plan import Plan
from allocopt.runtime import load_model
from allocopt.runtime.loading import LoadOptions
from allocopt.runtime.offload import tensor_bytes
from reliability_kit import TEXT, save_tiny_model

# per-expert tensors (olmoe, qwen2_moe with a shared expert, mixtral), group-limited routing with a selection bias
# (deepseek_v3), experts fused on disk (gpt_oss)
FAMILIES = {
    "olmoe": {},
    "qwen2_moe": {},
    "mixtral": {},
    "deepseek_v3": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "gpt_oss": {},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_model(root / "model", family=request.param, seed=5, **FAMILIES[request.param])
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    return request.param, root


def _config(root: Path, tmp_path: Path, **budget) -> RunConfig:
    return RunConfig.from_sources(None, {
        "model": str(root / "model"), "data": str(root / "data.txt"), "seq_len": 16, "search_num_seqs": 2,
        "calib_num_seqs": 2, "evals": 6, "population": 3, "optimizer": "ga", "device": "cpu",
        "out": str(tmp_path / "run"), "run_name": "mem", **budget})


def test_the_size_model_counts_the_checkpoint_as_save_pretrained_wrote_it(saved):
    family, root = saved
    model, _ = load_model(str(root / "model"), LoadOptions(device="cpu"))
    size = export_size(model)
    assert size.full == tensor_bytes(root / "model"), family
    assert all(b > 0 for b in size.per_expert.values()) and size.base > 0


def test_a_byte_budget_gives_an_export_of_exactly_the_counted_bytes(saved, tmp_path):
    """The plan fits the budget to within one expert (one per routing group), and its export's tensors on disk
    weigh exactly what plan.json says, in memory and streamed from an offloaded model."""
    family, root = saved
    model, _ = load_model(str(root / "model"), LoadOptions(device="cpu"))
    size, info = export_size(model), describe(model)
    smallest = size.bytes({l.index: l.min_kept for l in info.layers})
    memory = (smallest + size.full) // 2 + 1                 # halfway between the smallest plan and no pruning
    result = run_search(_config(root, tmp_path, memory=str(memory)), progress=False)
    plan = Plan.load(result.plan_path)
    budget, counted = plan.extra["memory_budget_bytes"], plan.extra["export_bytes"]
    step = max(size.per_expert.values()) * max(l.groups or 1 for l in info.layers)   # one expert per routing group
    assert budget == memory and budget - step < counted <= budget, (budget, counted, step)
    assert plan.extra["full_export_bytes"] == size.full
    assert counted == size.bytes({lp.index: len(lp.kept) for lp in plan.layers})
    for extra in ([], ["--max-memory", "cpu=1MiB", "--offload-dir", str(tmp_path / "offload")]):
        out = tmp_path / ("streamed" if extra else "in-memory")
        done = CliRunner().invoke(cli, ["prune", "--plan", str(result.plan_path), "--out", str(out), "--quiet", *extra])
        assert done.exit_code == 0, done.output
        assert tensor_bytes(out) == counted, (family, extra)


def test_a_budget_in_bytes_is_one_of_the_budgets_and_bad_ones_are_refused(tmp_path):
    save_tiny_model(tmp_path / "model", family="olmoe", seed=5)
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(AllocoptError, match="both keep and memory are set; give only one budget"):
        RunConfig.from_sources(None, {"memory": "1MB", "keep": 8})
    with pytest.raises(AllocoptError, match="memory 'lots' is not a size; write e.g. 12GiB"):
        RunConfig.from_sources(None, {"memory": "lots"})
    with pytest.raises(AllocoptError, match="memory_ratio must lie strictly between 0 and 1"):
        RunConfig.from_sources(None, {"memory_ratio": 1.5})
    problem = tmp_path / "p.toml"
    problem.write_text('sparsity = 0.5\n')
    assert RunConfig.from_sources(problem, {"memory": "2MB"}).sparsity is None    # the command line's budget wins
    ratio = run_search(_config(tmp_path, tmp_path, memory_ratio=0.9), progress=False).summary
    assert ratio["memory_budget_bytes"] == int(0.9 * ratio["full_export_bytes"]) >= ratio["export_bytes"]
    result = CliRunner().invoke(cli, ["run", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"),
                                      "--memory", "10KB", "--out", str(tmp_path / "small"), "--quiet"])
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "memory 10KB" in lines[0], result.output
    assert not (tmp_path / "small").exists()


def test_layers_no_plan_changes_count_in_the_experts_a_byte_budget_keeps():
    """A hash-routed layer keeps all its experts whatever the plan: its bytes are fixed and its experts are part of
    the total kept that the budget becomes."""
    size = ExportSize(base=100, per_expert={0: 10, 1: 10}, num_experts={0: 4, 1: 8})
    prunable = {0: False, 1: True}
    assert size.kept_for(100 + 40 + 55, prunable=prunable) == 4 + 5           # room for 5 of layer 1's experts
    assert size.kept_for(100 + 40 + 55, unit=2, prunable=prunable) == 4 + 4
    assert size.bytes({0: 4, 1: 5}) <= 195 < size.bytes({0: 4, 1: 6})
    assert size.kept_for(120, prunable=prunable) == -1                         # not even the fixed part fits
