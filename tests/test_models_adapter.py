"""describe / find_moe_blocks / mask_experts on tiny real transformers models of every family."""
from __future__ import annotations

import pytest
import torch
import transformers

from allocopt.errors import AllocoptError
from allocopt.models import describe, find_moe_blocks, mask_experts, model_fingerprint
from conftest import FAMILIES, random_kept

# What the stock modelling code does (read from transformers' modeling_*.py), and the tiny configs' dense layers.
EXPECTED_RULE = {
    "olmoe": "softmax->topk", "qwen3_moe": "softmax->topk", "qwen2_moe": "softmax->topk",
    "mixtral": "softmax->topk->renorm", "deepseek_v3": "sigmoid+bias->group-topk->renorm*2.5", "gpt_oss": "topk->softmax",
    "ernie4_5_moe": "softmax+bias->topk->clamp-renorm", "glm4_moe": "sigmoid+bias->group-topk->renorm",
}
FIRST_DENSE = {"deepseek_v3", "glm4_moe", "ernie4_5_moe"}
SHARED = {"qwen2_moe": 1, "deepseek_v3": 2, "glm4_moe": 2, "ernie4_5_moe": 2}
SELECTION_BIAS = {"deepseek_v3", "glm4_moe", "ernie4_5_moe"}
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _expected_bytes_per_expert(config, family: str) -> int:
    inter = config.intermediate_size if family in ("olmoe", "mixtral", "gpt_oss") else config.moe_intermediate_size
    n = 3 * config.hidden_size * inter
    if family == "gpt_oss":                           # gate_up and down biases
        n += 2 * inter + config.hidden_size
    return 4 * n


def _selected(model, run):
    """Expert ids each MoE layer's experts module actually receives while ``run()`` executes."""
    seen: dict[int, set[int]] = {}
    def hook(layer):
        return lambda mod, args: seen.setdefault(layer, set()).update(args[1].flatten().tolist())
    handles = [b.experts.register_forward_pre_hook(hook(b.layer)) for b in find_moe_blocks(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _nonuniform(model, seed=0):
    return random_kept(describe(model), (3, 6, 4), seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_describe(tiny_model, family):
    model = tiny_model(family)
    info = describe(model)
    moe_layers = [1, 2] if family in FIRST_DENSE else [0, 1, 2]
    assert info.num_decoder_layers == 3
    assert [l.index for l in info.layers] == moe_layers
    assert info.num_experts == {l: 8 for l in moe_layers} and info.top_k == {l: 2 for l in moe_layers}
    assert info.architecture == type(model).__name__ and info.model_type == family and info.dtype == "float32"
    for layer in info.layers:
        assert layer.router_rule == EXPECTED_RULE[family]
        assert layer.num_shared_experts == SHARED.get(family, 0)
        assert layer.selection_bias == (family in SELECTION_BIAS)
        assert layer.storage == "fused"
        assert layer.bytes_per_expert == _expected_bytes_per_expert(model.config, family)
        assert model.get_submodule(layer.path) is find_moe_blocks(model)[info.layers.index(layer)].block
    assert info.expert_bytes == sum(l.num_experts * l.bytes_per_expert for l in info.layers)
    assert info.total_bytes == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())


def test_fingerprint_tracks_weights_and_survives_reload(tiny_model, tmp_path):
    model = tiny_model("olmoe", seed=0)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    assert model_fingerprint(tiny_model("olmoe", seed=1)) != model_fingerprint(model)
    assert model_fingerprint(reloaded.to(torch.bfloat16)) != model_fingerprint(tiny_model("olmoe", seed=1))


def test_dense_model_is_refused_by_name():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(AllocoptError, match=r"LlamaForCausalLM has no MoE block .*model\.layers"):
        describe(transformers.LlamaForCausalLM(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_experts_are_never_selected_and_mask_restores(tiny_model, family):
    model = tiny_model(family)
    layers = [l.index for l in describe(model).layers]
    kept = _nonuniform(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    biases = {n: b.clone() for n, b in list(model.named_buffers()) + list(model.named_parameters()) if "correction_bias" in n}
    with torch.no_grad():
        before = model(IDS).logits
        full = _selected(model, lambda: model(IDS))
        with mask_experts(model, kept):
            assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs    # no weight copies
            masked_sel = _selected(model, lambda: model(IDS))
            masked = model(IDS).logits
        after = model(IDS).logits
    assert any(full[l] - set(kept[l]) for l in layers), "the unmasked model should use experts the test prunes"
    assert all(masked_sel[l] <= set(kept[l]) for l in layers)
    assert not torch.equal(before, masked)
    assert torch.equal(before, after)
    for n, b in list(model.named_buffers()) + list(model.named_parameters()):
        if n in biases:
            assert torch.equal(b, biases[n])
    assert all("forward" not in b.router.__dict__ for b in find_moe_blocks(model))


def test_mask_leaves_unlisted_layers_alone_and_nests(tiny_model):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        with mask_experts(model, {1: [0, 1, 2]}):
            one = model(IDS).logits
            sel = _selected(model, lambda: model(IDS))
            with mask_experts(model, {1: [0, 1, 2, 3]}), mask_experts(model, {2: [4, 5]}):
                inner_sel = _selected(model, lambda: model(IDS))
            assert torch.equal(model(IDS).logits, one)
    assert sel[1] <= {0, 1, 2} and len(sel[0]) > 3 and len(sel[2]) > 3
    assert inner_sel[1] <= {0, 1, 2} and inner_sel[2] <= {4, 5}


@pytest.mark.parametrize("kept, message", [
    ({0: [0, 1]}, r"layers \[0\] are not MoE layers"),
    ({1: [0, 9]}, r"outside 0\.\.7"),
    ({1: [3]}, r"fewer than its top-k 2"),
])
def test_mask_rejects_bad_plans(tiny_model, kept, message):
    model = tiny_model("deepseek_v3")
    with pytest.raises(AllocoptError, match=message):
        with mask_experts(model, kept):
            pass
    assert all("forward" not in b.router.__dict__ for b in find_moe_blocks(model))
