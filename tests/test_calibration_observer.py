"""The observer against independent brute-force computations on tiny real transformers models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allocopt.calibration import observe
from allocopt.data.tokens import TokenSet
from allocopt.models import find_moe_blocks
from allocopt.testing.tiny import build_tiny_model
from conftest import FAMILIES


def _tokens(seed: int = 0, rows: int = 5, seq: int = 24, pad_rows: dict[int, int] | None = None) -> TokenSet:
    """Random ids; ``pad_rows`` {row: real length} right-pads those rows with random junk ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    for r, n in (pad_rows or {}).items():
        mask[r, n:] = 0
    return TokenSet(ids, mask, mask.bool(), "test")


@pytest.fixture(autouse=True)
def _no_grad():
    # block inputs are recorded inside the observer's inference_mode; hand computations must not track grads
    with torch.no_grad():
        yield


class _BlockInputs:
    """Record each MoE block's input (the hidden states the block really sees) with forward pre-hooks."""

    def __init__(self, model):
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.handles = [b.block.register_forward_pre_hook(self._hook(b.info.index)) for b in find_moe_blocks(model)]

    def _hook(self, layer):
        def hook(module, args):
            self.seen.setdefault(layer, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _olmoe_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert e computed by hand from the fused tensors: down(silu(gate) * up)."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def _brute_force(experts, router_fn, xs: list[torch.Tensor], masks: list[torch.Tensor], num_experts: int):
    """Per-expert sums over real tokens, token by token, from an independent routing rule."""
    acc = {k: torch.zeros(num_experts, dtype=torch.float64) for k in
           ("count", "gate_sum", "norm_sum", "gate_norm_sum", "sq_norm_sum", "gate2_sq_norm_sum", "max_act")}
    for x, real in zip(xs, masks):
        idx, w = router_fn(x)
        for t in real.nonzero().squeeze(1).tolist():
            for slot in range(idx.shape[1]):
                e, g = int(idx[t, slot]), float(w[t, slot])
                f = _olmoe_expert(experts, e, x[t]).double()
                n = float(f.norm())
                acc["count"][e] += 1
                acc["gate_sum"][e] += g
                acc["norm_sum"][e] += n
                acc["gate_norm_sum"][e] += g * n
                acc["sq_norm_sum"][e] += n * n
                acc["gate2_sq_norm_sum"][e] += g * g * n * n
                acc["max_act"][e] = max(float(acc["max_act"][e]), float(f.abs().max()))
    return acc


def _olmoe_router(weight, k):
    def route(x):
        probs = torch.softmax(x.float() @ weight.T.float(), dim=-1)
        w, idx = probs.topk(k, dim=-1)          # norm_topk_prob=False in the tiny OLMoE
        return idx, w
    return route


def _observe_recording(model, tokens, batch_size, **kw):
    rec = _BlockInputs(model)
    try:
        stats = observe(model, tokens, batch_size=batch_size, progress=False, **kw)
    finally:
        rec.close()
    masks = [b.attention_mask.reshape(-1).bool() for b in tokens.batches(batch_size)]
    return stats, rec.seen, masks


def _compare(stats, layer, expected):
    assert torch.equal(stats.count[layer], expected["count"])
    for name in ("gate_sum", "norm_sum", "gate_norm_sum", "sq_norm_sum", "gate2_sq_norm_sum", "max_act"):
        torch.testing.assert_close(getattr(stats, name)[layer], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_olmoe_matches_independent_brute_force():
    model = build_tiny_model("olmoe", seed=3)
    tokens = _tokens(seed=1, pad_rows={1: 9, 4: 17})
    stats, seen, masks = _observe_recording(model, tokens, batch_size=2)
    assert stats.num_tokens == tokens.num_tokens == 5 * 24 - 15 - 7
    for b in find_moe_blocks(model):
        layer = b.info.index
        expected = _brute_force(b.experts, _olmoe_router(b.router.weight, b.info.top_k), seen[layer], masks,
                                b.info.num_experts)
        _compare(stats, layer, expected)
        assert stats.count[layer].sum() == stats.num_tokens * b.info.top_k


def test_similarity_is_mean_cosine_of_expert_outputs():
    model = build_tiny_model("olmoe", seed=4)
    tokens = _tokens(seed=2, rows=3, seq=16, pad_rows={2: 6})
    stats, seen, masks = _observe_recording(model, tokens, batch_size=3, similarity_tokens=1000)  # all real tokens
    for b in find_moe_blocks(model):
        x = seen[b.info.index][0][masks[0]]
        outs = torch.stack([_olmoe_expert(b.experts, e, x) for e in range(b.info.num_experts)], 1).double()
        unit = outs / outs.norm(dim=-1, keepdim=True)
        expected = torch.einsum("tih,tjh->ij", unit, unit) / x.shape[0]
        torch.testing.assert_close(stats.similarity[b.info.index], expected.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.diagonal(stats.similarity[b.info.index]), torch.ones(b.info.num_experts))


def test_similarity_sample_is_bounded_and_deterministic():
    model = build_tiny_model("olmoe", seed=4)
    tokens = _tokens(seed=2, rows=3, seq=16)
    a = observe(model, tokens, batch_size=3, progress=False, similarity_tokens=5)
    b = observe(model, tokens, batch_size=3, progress=False, similarity_tokens=5)
    full = observe(model, tokens, batch_size=3, progress=False, similarity_tokens=1000)
    for layer in a.layers:
        assert torch.equal(a.similarity[layer], b.similarity[layer])
        assert not torch.allclose(a.similarity[layer], full.similarity[layer])  # only 5 tokens were sampled
        assert torch.equal(a.count[layer], full.count[layer])                # routing stats do not depend on it


@pytest.mark.parametrize("family", FAMILIES)
def test_observer_does_not_change_model_output(family):
    model = build_tiny_model(family, seed=0)
    tokens = _tokens(seed=5, rows=4, seq=16, pad_rows={0: 10})
    with torch.inference_mode():
        plain = [model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits for b in tokens.batches(2)]
    during: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: during.append(o.logits.clone()))
    try:
        observe(model, tokens, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(during) == len(plain)
    for p, d in zip(plain, during):
        assert torch.equal(d, p), (d - p).abs().max()
    assert all("forward" not in b.experts.__dict__ for b in find_moe_blocks(model))  # wrapper removed


def test_padding_is_excluded():
    model = build_tiny_model("qwen3_moe", seed=1)
    padded = _tokens(seed=7, rows=2, seq=20, pad_rows={1: 8})
    other_junk = TokenSet(padded.input_ids.clone(), padded.attention_mask, padded.score_mask, "test")
    other_junk.input_ids[1, 8:] = (other_junk.input_ids[1, 8:] + 17) % 256
    alone = [TokenSet(padded.input_ids[r:r + 1, :n], padded.attention_mask[r:r + 1, :n], padded.score_mask[r:r + 1, :n], "t")
             for r, n in ((0, 20), (1, 8))]
    a = observe(model, padded, batch_size=2, progress=False)
    b = observe(model, other_junk, batch_size=2, progress=False)
    parts = [observe(model, t, batch_size=1, progress=False) for t in alone]
    assert a.num_tokens == 28
    for layer in a.layers:
        assert torch.equal(a.count[layer], b.count[layer])
        assert torch.equal(a.count[layer], parts[0].count[layer] + parts[1].count[layer])
        torch.testing.assert_close(a.norm_sum[layer], parts[0].norm_sum[layer] + parts[1].norm_sum[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.gate_norm_sum[layer], b.gate_norm_sum[layer], rtol=1e-6, atol=1e-7)


def _deepseek_router(router, k):
    """DeepSeek-V3 with n_group=1: sigmoid scores, select top-k of score + correction bias, weight by the
    UNBIASED scores renormalised and scaled."""
    def route(x):
        scores = torch.sigmoid(x.float() @ router.weight.T.float())
        idx = (scores + router.e_score_correction_bias).topk(k, dim=-1).indices
        w = scores.gather(1, idx)
        return idx, w / w.sum(-1, keepdim=True) * router.routed_scaling_factor
    return route


def test_deepseek_v3_counts_follow_bias_corrected_selection():
    model = build_tiny_model("deepseek_v3", seed=2, n_group=1, topk_group=1)     # the reference below has no groups
    tokens = _tokens(seed=3, rows=4, seq=20, pad_rows={3: 11})
    stats, seen, masks = _observe_recording(model, tokens, batch_size=2)
    assert stats.layers == [1, 2]  # first_k_dense_replace=1: layer 0 is dense
    differs = False
    for b in find_moe_blocks(model):
        layer, k = b.info.index, b.info.top_k
        expected = _brute_force(b.experts, _deepseek_router(b.router, k), seen[layer], masks, b.info.num_experts)
        _compare(stats, layer, expected)
        # the selection bias matters here: plain top-k of the scores would count different experts
        naive = torch.zeros(b.info.num_experts, dtype=torch.float64)
        for x, real in zip(seen[layer], masks):
            naive += torch.bincount(torch.sigmoid(x[real] @ b.router.weight.T).topk(k).indices.reshape(-1),
                                    minlength=b.info.num_experts).double()
        differs |= not torch.equal(naive, stats.count[layer])
    assert differs


def _ernie_router(router, k):
    """ERNIE-4.5: fp32 softmax, select top-k of prob + correction bias, weight by the unbiased probs renormalised
    with a clamp at moe_norm_min."""
    def route(x):
        probs = torch.softmax(x.float() @ router.weight.T.float(), dim=-1)
        idx = (probs + router.moe_statics.e_score_correction_bias[0]).topk(k, dim=-1).indices
        w = probs.gather(1, idx)
        return idx, w / w.sum(-1, keepdim=True).clamp(min=router.norm_min)
    return route


def test_ernie_counts_follow_bias_corrected_selection():
    model = build_tiny_model("ernie4_5_moe", seed=6)
    tokens = _tokens(seed=8, rows=4, seq=20, pad_rows={0: 13})
    stats, seen, masks = _observe_recording(model, tokens, batch_size=4)
    for b in find_moe_blocks(model):
        layer = b.info.index
        _compare(stats, layer, _brute_force(b.experts, _ernie_router(b.router, b.info.top_k), seen[layer], masks,
                                            b.info.num_experts))


def test_wrappers_are_removed_when_the_forward_fails():
    model = build_tiny_model("olmoe", seed=0)
    tokens = _tokens(rows=2, seq=8)
    tokens.input_ids[1, 3] = 10_000  # outside the 256-token vocabulary: the embedding raises mid-pass
    with pytest.raises(IndexError):
        observe(model, tokens, batch_size=1, progress=False)
    assert all("forward" not in b.experts.__dict__ for b in find_moe_blocks(model))


def test_float16_router_overflow_is_refused_and_bfloat16_is_not():
    """A router whose logits reach ~2e5 overflows float16 only; its statistics would be NaN, so observe refuses."""
    from allocopt.errors import AllocoptError
    from reliability_kit import overflow_in_float16

    tokens = _tokens(rows=2, seq=8)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = overflow_in_float16(build_tiny_model("olmoe", seed=0)).to(dtype)
        gate = model.model.layers[1].mlp.gate
        hook = gate.register_forward_hook(lambda m, a, out, d=dtype: logits.__setitem__(d, out[0].clone()))
        if dtype == torch.float16:
            with pytest.raises(AllocoptError, match=r"layer 1: router logits are not finite \(inf/NaN\) in float16.*bfloat16"):
                observe(model, tokens, batch_size=2, progress=False)
        else:
            stats = observe(model, tokens, batch_size=2, progress=False)
            assert not stats.nonfinite() and float(stats.count[1].sum()) == 2 * 8 * 2
        hook.remove()
        assert all("forward" not in b.experts.__dict__ and not b.router._forward_hooks for b in find_moe_blocks(model))
    assert torch.isfinite(logits[torch.float32]).all() and torch.isfinite(logits[torch.bfloat16]).all()
    assert logits[torch.float32].abs().max() > 65504 and not torch.isfinite(logits[torch.float16]).all()
