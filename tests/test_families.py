"""Every causal-LM type of the installed transformers that has routed experts, end to end (issue 11).

The type list is computed from transformers (``allocopt.models.catalog``), so a newer transformers that adds a
family fails here until the family has a row in ``allocopt/models/families.py`` or is listed in UNSUPPORTED with
its reason. Per type, on a tiny random model with randomised routers and selection biases (so a missed bias or a
tie shows up) and, where the family routes by groups, 2 groups with 1 kept:

    allocopt info (rule checked by running the real router against the rule's reference implementation; shared
    experts checked against the shared modules' size) -> a short allocopt run -> allocopt prune of its plan.json
    -> exported logits == masked logits (<= 1e-5, fp32) and the export's ESAP == the run's ESAP.

The table of results is written to /tmp/family_table.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.data import load_tokens
from allocopt.models import describe, find_moe_blocks, load_pruned, mask_experts
from allocopt.runtime import load_model
from allocopt.models.catalog import moe_causal_lm_types
from allocopt.models.families import family_for, is_known
from allocopt.models.router_probe import verify
from allocopt.testing.tiny import build_tiny_model
from allocopt.objectives import Evaluator
from allocopt.plan import Plan
from reliability_kit import TEXT, save_tokenizer

TYPES = sorted(moe_causal_lm_types())
UNSUPPORTED = {"doge": "product keys"}         # type -> words the one-line refusal must contain
TABLE = Path("/tmp/family_table.md")
RUN = ["--seq-len", "16", "--num-seqs", "2", "--calib-num-seqs", "2", "--evals", "5", "--population", "4",
       "--sparsity", "0.5", "--criterion", "reap", "--optimizer", "ga", "--quiet", "--json"]
ROWS: dict[str, str] = {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    save_tokenizer(root / "tokenizer")
    yield root
    lines = ["| type | rule | shared | run | prune | export == masked | ESAP diff |", "|---|---|---|---|---|---|---|"]
    TABLE.write_text("\n".join(lines + [ROWS[t] for t in sorted(ROWS)]) + "\n")


def test_every_type_has_a_row_or_a_reason():
    missing = [t for t in TYPES if not is_known(t) and t not in UNSUPPORTED]
    assert not missing, f"transformers types without a family row: {missing}; add rows to allocopt/models/families.py"
    assert not set(UNSUPPORTED) - set(TYPES)
    assert all(family_for(t).unsupported for t in UNSUPPORTED)


def _shared_count_matches_modules(model, block) -> bool:
    """Fused shared experts (DeepSeek's n_shared_experts widen one MLP) hold count x one routed expert's weights;
    otherwise the count is the number of shared modules."""
    family, info = block.family, block.info
    layer = model.get_submodule(info.path.rsplit(".", 1)[0]) if "." in info.path else model
    mods = [m for a in family.shared_expert_attrs for owner in (block.block, layer)
            if isinstance(m := getattr(owner, a, None), torch.nn.Module)]
    if not mods:
        return info.num_shared_experts == 0
    if family.shared_count_field:
        numel = sum(p.numel() for m in mods for p in m.parameters() if p.dim() >= 2)
        per_expert = sum(t.numel() // rows for _, t, rows in
                         __import__("allocopt.models.adapter", fromlist=["expert_tensors"]).expert_tensors(
                             block.experts, info.num_experts, block.tail, family.expert_layout,
                             {id(t) for t in block.router.parameters()}) if t.dim() >= 2)
        return numel == info.num_shared_experts * per_expert
    return info.num_shared_experts == len(mods)


@pytest.mark.parametrize("model_type", TYPES)
def test_family_end_to_end(data, tmp_path, model_type):
    runner = CliRunner()
    if model_type in UNSUPPORTED:
        build_tiny_model(model_type).save_pretrained(tmp_path / "model")
        save_tokenizer(tmp_path / "model")
        result = runner.invoke(cli, ["info", "--model", str(tmp_path / "model")])
        assert result.exit_code == 2 and UNSUPPORTED[model_type] in result.output
        ROWS[model_type] = f"| {model_type} | unsupported: {family_for(model_type).unsupported} | | | | | |"
        return
    model = build_tiny_model(model_type, seed=5)
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tmp_path / "model")
    model_dir = str(tmp_path / "model")

    # info: the rule the table gives, checked by running the real router; shared experts against module sizes
    info = runner.invoke(cli, ["info", "--model", model_dir, "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.output.strip().splitlines()[-1])
    reloaded, _ = load_model(model_dir)
    assert all(verify(reloaded, find_moe_blocks(reloaded)).values()), f"{model_type}: the family rule does not reproduce the router"
    blocks = find_moe_blocks(reloaded)
    assert [l["router_rule"] for l in described["layers"]] == [b.info.router_rule for b in blocks]
    assert all(_shared_count_matches_modules(reloaded, b) for b in blocks)
    assert "unknown" not in {l["router_rule"] for l in described["layers"]}

    # run -> prune
    run = runner.invoke(cli, ["run", "--model", model_dir, "--data", str(data / "data.txt"), *RUN,
                              "--out", str(tmp_path / "run"), "--name", "r", "--storage", f"sqlite:///{tmp_path}/r.db"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output.strip().splitlines()[-1])
    plan = Plan.load(tmp_path / "run" / "plan.json")
    prune = runner.invoke(cli, ["prune", "--plan", str(tmp_path / "run" / "plan.json"), "--out", str(tmp_path / "out"),
                                "--quiet"])
    assert prune.exit_code == 0, prune.output

    # export == masked, and the export scores what the run reported
    exported = load_pruned(tmp_path / "out")
    assert describe(exported).num_experts == {lp.index: len(lp.kept) for lp in plan.layers}
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mask_experts(reloaded, plan.kept):
        masked = reloaded(ids, use_cache=False).logits
    with torch.no_grad():
        diff = (exported(ids, use_cache=False).logits - masked).abs().max().item()
    assert diff <= 1e-5
    tokens = load_tokens(str(data / "data.txt"), load_model(model_dir)[1], 16, 2, split="search")
    esap = Evaluator(reloaded, tokens).score_model(exported).value
    assert esap == pytest.approx(summary["esap"], abs=1e-6)
    layer = described["layers"][-1]
    ROWS[model_type] = (f"| {model_type} | {layer['router_rule']} | {layer['num_shared_experts']} | {summary['counts']} "
                        f"| {sum(len(k) for k in plan.kept.values())}/{sum(l['num_experts'] for l in described['layers'])} "
                        f"| {diff:.1e} | {abs(esap - summary['esap']):.1e} |")


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_a_type_without_a_row_gets_its_rule_inferred_by_running_its_router(monkeypatch, model_type):
    """What a new transformers release's MoE type goes through before it has a row: discovery finds the blocks, the
    router probe replays candidate rules on the real router's logits, and the simplest that reproduces it is used."""
    from allocopt.models import families
    from allocopt.models.adapter import invalidate

    model = build_tiny_model(model_type, seed=3)        # the tiny recipe reads the row: build first, then drop it
    known = [(b.info.groups, b.info.min_kept) for b in find_moe_blocks(model)]
    monkeypatch.delitem(families.FAMILIES, model_type)
    assert not is_known(model_type)
    invalidate(model)
    blocks = find_moe_blocks(model)
    assert all(b.info.router_rule.endswith("(inferred)") for b in blocks), [b.info.router_rule for b in blocks]
    assert all(verify(model, blocks).values())
    assert [(b.info.groups, b.info.min_kept) for b in blocks] == known       # the same pruning constraints


def test_a_rule_that_cannot_apply_is_a_mismatch():
    """`matches` used to turn five exception types into "rule does not match", hiding real faults; now only a rule
    that cannot run on this router's output (RuleMismatch, a ValueError) counts as a mismatch."""
    from allocopt.models.router_probe import matches, probe
    from allocopt.models.routing import RouterRule, RoutingParams, RuleMismatch, route

    model = build_tiny_model("olmoe", seed=2)
    blocks = find_moe_blocks(model)
    seen, ids = probe(model, blocks)
    block = blocks[0]
    groups = RouterRule("softmax", group="top2-sum")
    params = RoutingParams("softmax", top_k=block.info.top_k, n_group=3, topk_group=1)   # 3 groups of 8 experts
    with pytest.raises(RuleMismatch, match="do not form 3 equal groups"):
        route(groups, params, seen[block.layer].logits[0], block.info.num_experts)
    assert matches(groups, params, block, seen[block.layer], ids) is False
    assert matches(block.family.rule, block.params, block, seen[block.layer], ids) is True
