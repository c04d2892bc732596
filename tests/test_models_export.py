"""Structural export == run-time masking, strict reload, loading errors and the info/prune CLI."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from allocopt.cli.main import cli
from allocopt.errors import AllocoptError
from allocopt.models import describe, load_pruned, mask_experts, prune_model
from allocopt.runtime import load_model
from allocopt.export import save_pruned
from allocopt.plan import Plan
from conftest import FAMILIES, random_kept

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _plan(net, counts=(3, 6, 4), seed=0, **extra) -> Plan:
    info = describe(net)
    kept = random_kept(info, counts, seed)
    return Plan.from_counts(info.fingerprint, kept, info.num_experts, {l: len(k) for l, k in kept.items()}, **extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_equals_export_then_reload(tiny_model, family, tmp_path):
    model = tiny_model(family, seed=2)
    plan = _plan(model)
    with torch.no_grad(), mask_experts(model, plan.kept):
        masked = model(IDS).logits
    save_pruned(model, None, tmp_path / "out", plan, card="# card\n")
    reloaded = load_pruned(tmp_path / "out")
    with torch.no_grad():
        exported = reloaded(IDS).logits
    assert (masked - exported).abs().max().item() <= 1e-5
    info = describe(reloaded)
    assert info.num_experts == {lp.index: len(lp.kept) for lp in plan.layers}
    assert type(reloaded).__name__ == type(model).__name__ and type(reloaded).__module__ == type(model).__module__
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_num_experts"] == [info.num_experts.get(i) for i in range(3)]
    assert Plan.load(tmp_path / "out" / "plan.json").kept == plan.kept
    assert (tmp_path / "out" / "README.md").read_text() == "# card\n"
    assert not list((tmp_path / "out").glob("*.bin"))


def test_prune_rejects_another_models_plan_and_too_few_experts(tiny_model):
    model = tiny_model("olmoe", seed=0)
    other = _plan(tiny_model("olmoe", seed=1))
    with pytest.raises(AllocoptError, match="made for another model"):
        prune_model(model, other)
    with pytest.raises(AllocoptError, match="fewer than its top-k"):
        prune_model(model, {0: [3], 1: [0, 1, 2, 3], 2: [4, 5, 6, 7]})
    assert describe(model).num_experts == {0: 8, 1: 8, 2: 8}    # nothing was touched


def test_group_routing_requires_balanced_removal(tiny_model):
    model = tiny_model("deepseek_v3", seed=3, n_group=2, topk_group=1)
    with pytest.raises(AllocoptError, match=r"group-limited routing .* \[3, 1\] experts per group"):
        prune_model(model, {1: [0, 1, 2, 4], 2: list(range(8))})
    with pytest.raises(AllocoptError, match=r"at least 2, and the plan keeps \[1, 1\] experts per group"):
        prune_model(model, {1: [0, 4], 2: list(range(8))})         # the group score reads each group's best two
    balanced = {1: [0, 2, 5, 7], 2: [1, 2, 3, 4, 5, 6]}
    with torch.no_grad(), mask_experts(model, balanced):
        masked = model(IDS).logits
    prune_model(model, balanced)
    with torch.no_grad():
        assert (model(IDS).logits - masked).abs().max().item() <= 1e-5


def test_load_pruned_refuses_missing_key(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    save_pruned(model, None, tmp_path / "out", _plan(model))
    [shard] = (tmp_path / "out").glob("*.safetensors")
    weights = load_file(shard)
    del weights["model.layers.1.mlp.gate.weight"]
    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(AllocoptError, match=r"missing_keys: model\.layers\.1\.mlp\.gate\.weight"):
        load_pruned(tmp_path / "out")
    expert_key = next(k for k in weights if ".experts." in k)     # one of a fused group: a shape mismatch instead
    del weights[expert_key]
    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(AllocoptError, match="does not match its config"):
        load_pruned(tmp_path / "out")


def test_load_model_errors_and_pruned_autodetect(tiny_model, tmp_path):
    with pytest.raises(AllocoptError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AllocoptError, match="is a file, not a directory"):
        load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AllocoptError, match="has no config.json"):
        load_model(tmp_path / "empty")
    model = tiny_model("mixtral")
    save_pruned(model, None, tmp_path / "out", _plan(model))
    loaded, tokenizer = load_model(tmp_path / "out")
    assert tokenizer is None and not loaded.training
    assert describe(loaded).num_experts == describe(model).num_experts == {0: 3, 1: 6, 2: 4}


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("family, rule, shared, layers", [
    ("deepseek_v3", "sigmoid+bias->group-topk->renorm*2.5", 2, [1, 2]),
    ("qwen2_moe", "softmax->topk", 1, [0, 1, 2]),
])
def test_cli_info(tiny_model, tmp_path, family, rule, shared, layers):
    tiny_model(family).save_pretrained(tmp_path)
    result = _invoke("info", "--model", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert rule in result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert [(l["index"], l["num_experts"], l["top_k"], l["num_shared_experts"], l["router_rule"]) for l in data["layers"]] == \
        [(i, 8, 2, shared, rule) for i in layers]
    rows = [line.split() for line in result.output.splitlines() if line.split()[:1] in ([str(i)] for i in layers)]
    assert [r[:4] for r in rows] == [[str(i), "8", "2", str(shared)] for i in layers]


def test_cli_info_dense_model_fails_on_one_line(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    result = CliRunner().invoke(cli, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]          # earlier lines are transformers' own progress bars
    assert last.startswith("error: LlamaForCausalLM has no MoE block") and result.output.count("error:") == 1


def test_cli_prune_end_to_end(tiny_model, tmp_path):
    model = tiny_model("ernie4_5_moe", seed=4)
    model.save_pretrained(tmp_path / "src")
    plan = _plan(model, counts=(2, 5), esap=0.9731, model=str(tmp_path / "src"))
    plan.save(tmp_path / "plan.json")
    with torch.no_grad(), mask_experts(model, plan.kept):
        masked = model(IDS).logits
    result = _invoke("prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "0.9731" in card and "| 1 | 8 | 2 |" in card and "| 2 | 8 | 5 |" in card
    with torch.no_grad():
        assert (load_pruned(tmp_path / "out")(IDS).logits - masked).abs().max().item() <= 1e-5
    tiny_model("ernie4_5_moe", seed=5).save_pretrained(tmp_path / "other")
    bad = CliRunner().invoke(cli, ["prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o2"),
                                   "--model", str(tmp_path / "other")])
    assert bad.exit_code == 2 and "made for another model" in bad.output and not (tmp_path / "o2").exists()


def test_damaged_exports_fail_in_one_line(tiny_model, tmp_path):
    """An export whose config lost layer_num_experts, and a plain checkpoint missing a tensor, are refused by name;
    transformers alone would re-initialise the missing weights with a warning."""
    model = tiny_model("qwen3_moe")
    save_pruned(model, None, tmp_path / "out", _plan(model))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    del config["layer_num_experts"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["info", "--model", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert 'lost "layer_num_experts"' in result.output and "re-export it with `allocopt prune`" in result.output

    tiny_model("olmoe").save_pretrained(tmp_path / "plain")
    [shard] = (tmp_path / "plain").glob("*.safetensors")
    weights = load_file(shard)
    del weights["model.layers.2.mlp.gate.weight"]
    save_file(weights, shard, metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["info", "--model", str(tmp_path / "plain")])
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "missing_keys: model.layers.2.mlp.gate.weight" in result.output and "incomplete or damaged" in result.output
