"""Quantized routed experts (issue 23, item 2): what ESAP scores is what the export stores, the engine keys prefix reuse
and its result cache by (kept set, bits), and each layer's quantized levels are computed once."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.export.quantized import compress_weight, compressed_bytes
from allocopt.models import describe, find_moe_blocks, mask_experts
from allocopt.models import quantization as Q
from allocopt.models.quantization import WeightScheme, quantize_experts, quantize_matrix
from allocopt.objectives import Evaluator
from allocopt.plan import Plan
from allocopt.testing.tiny import build_tiny_model


def _tokens(rows: int = 4, length: int = 24, seed: int = 0) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    score = attn.bool().clone()
    score[:, -1] = False
    return TokenSet(ids, attn, score)


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model("olmoe", seed=0)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    return m


def _plan(model, kept: dict[int, list[int]], bits: dict[int, int]) -> Plan:
    info = describe(model)
    counts = {l.index: len(kept.get(l.index, range(l.num_experts))) for l in info.layers}
    ranking = {l.index: list(kept.get(l.index, range(l.num_experts))) for l in info.layers}
    return Plan.from_counts(info.fingerprint, ranking, info.num_experts, counts, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_scored_weights_are_what_compressed_tensors_unpacks_from_the_export(model, bits):
    from compressed_tensors.compressors import PackedQuantizationCompressor

    from allocopt.export.quantized import quantization_scheme

    scheme = WeightScheme.for_model(model)
    assert scheme.group_size == 32                        # olmoe's expert widths 64 and 96 share groups of 32
    block = find_moe_blocks(model)[0]
    for name, tensor in block.experts.named_parameters():
        w = tensor.detach()[3]                            # one expert's matrix [out, in]
        q, scale, scored = quantize_matrix(w, bits, scheme)
        assert q.int().abs().max() <= 2 ** (bits - 1) and scale.shape == (w.shape[0], w.shape[1] // 32)
        stored = compress_weight(w, bits, scheme)
        assert stored["weight_packed"].dtype == torch.int32 and list(stored["weight_shape"]) == list(w.shape)
        unpacked = PackedQuantizationCompressor.decompress(stored, quantization_scheme(bits, scheme, ["Linear"]))["weight"]
        assert torch.equal(unpacked.to(w.dtype), scored), name
        assert sum(t.numel() * t.element_size() for t in stored.values()) == compressed_bytes(tuple(w.shape), w.dtype,
                                                                                             bits, scheme)
        assert 0 < (scored - w).abs().max() <= scale.abs().max() / 2 + 1e-7     # round to nearest: half a step


def test_quantize_experts_changes_only_the_named_layers_and_restores_the_model(model):
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    blocks = find_moe_blocks(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        full = model(ids).logits
        with quantize_experts(model, {blocks[1].layer: 4}):
            quant = model(ids).logits
            inside = model.state_dict()
            changed = {n for n, t in inside.items() if not torch.equal(t, before[n])}
        after = model(ids).logits
    assert changed and all(f".layers.{blocks[1].layer}.mlp.experts." in n for n in changed)
    assert (quant - full).abs().max() > 1e-4
    assert torch.equal(after, full)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_a_plan_with_bits_scores_the_model_whose_experts_hold_the_quantized_weights(model):
    tokens = _tokens()
    info = describe(model)
    l0, l1 = info.layers[0].index, info.layers[1].index
    kept = {l0: [0, 2, 3, 5, 7], l1: [1, 2, 4, 6]}
    plan = _plan(model, kept, {l1: 4, l0: 8})
    ev = Evaluator(model, tokens, exact=True)
    [v] = ev.evaluate([plan])
    twin = copy.deepcopy(model)
    scheme = WeightScheme.for_model(model)
    with torch.no_grad():
        for block in find_moe_blocks(twin):
            bits = plan.bits.get(block.layer)
            for _, t in block.experts.named_parameters() if bits else ():
                t.copy_(quantize_matrix(t.detach(), bits, scheme)[2])
    with mask_experts(twin, kept):
        direct = ev.score_model(twin)
    assert v.value == pytest.approx(direct.value, abs=1e-6)
    [plain] = ev.evaluate([_plan(model, kept, {})])
    assert plain.value != pytest.approx(v.value, abs=1e-6)       # the bits are part of the plan's identity


def test_prefix_reuse_and_the_result_cache_key_on_kept_set_and_bits(model):
    tokens = _tokens()
    info = describe(model)
    layers = [l.index for l in info.layers]
    kept = {layers[0]: [0, 1, 2, 3, 4], layers[-1]: [1, 3, 5, 7]}
    plans = [_plan(model, kept, bits) for bits in ({}, {layers[-1]: 4}, {layers[-1]: 8}, {layers[0]: 4},
                                                   {layers[0]: 4, layers[-1]: 4})]
    fast = Evaluator(model, tokens, exact=True)
    slow = Evaluator(model, tokens, exact=True, batch_size=1, prefix_reuse=False, head_rows=False)
    a, b = fast.evaluate(plans), slow.evaluate(plans)
    assert fast.counters["prefix_hits"] > 0
    assert [x.value for x in a] == pytest.approx([y.value for y in b], abs=1e-6)   # batch size 1: float summation order
    assert len({round(x.value, 5) for x in a}) == len(plans)
    assert fast.evaluate(plans[::-1]) == a[::-1] and fast.counters["evaluated"] == len(plans)


def test_each_layers_levels_are_quantized_once_however_many_plans_use_them(model, monkeypatch):
    calls = []
    real = Q.quantize_matrix
    monkeypatch.setattr(Q, "quantize_matrix", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    Q.clear_levels(model)
    info = describe(model)
    layers = [l.index for l in info.layers]
    plans = [_plan(model, {layers[1]: list(range(k, k + info.layers[1].top_k + 1))}, {layers[1]: 4, layers[2]: 8})
             for k in range(3)]
    Evaluator(model, _tokens(), exact=True).evaluate(plans)
    tensors = len(list(find_moe_blocks(model)[0].experts.parameters()))
    assert sorted(calls) == [4] * tensors + [8] * tensors       # layer 1 at 4 bits, layer 2 at 8: once each


def test_bad_bits_are_refused_in_one_line_with_the_fix(model, tmp_path):
    info = describe(model)
    plan = _plan(model, {}, {})
    obj = plan.to_json()
    for value, words in ((5, "bit-width 5 is not one"), ("4", 'string "4", not an integer'), (True, "not an integer")):
        obj["layers"][0]["bits"] = value
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(obj))
        with pytest.raises(AllocoptError, match=words) as err:
            Plan.load(path)
        assert "\n" not in str(err.value)
    obj["layers"][0]["bits"] = 4
    path.write_text(json.dumps(obj))
    loaded = Plan.load(path)
    assert loaded.bits == {info.layers[0].index: 4} and loaded.to_json() == obj
    with pytest.raises(AllocoptError, match="not MoE layers"):
        with quantize_experts(model, {999: 4}):
            pass
