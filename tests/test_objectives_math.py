"""ESAP/KL/NLL per-position math and the sparse teacher cache: certified bounds on random distributions."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.objectives import OBJECTIVES, get_objective
from allocopt.objectives import divergences as d
from allocopt.objectives.teacher import build_teacher


def _plain_esap(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits_p.double(), -1)
    q = torch.softmax(logits_q.double(), -1)
    return torch.minimum(p, q).sum(-1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), v=st.integers(2, 300), scale=st.floats(0.1, 8.0),
       keep_frac=st.floats(0.0, 1.0))
def test_sparse_bound_contains_exact_for_any_kept_subset(seed, n, v, scale, keep_frac):
    g = torch.Generator().manual_seed(seed)
    lp, lq = torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale
    p = torch.softmax(lp, -1)
    keep = torch.rand(n, v, generator=g) < keep_frac          # any subset, not only the top entries
    rows, ids = keep.nonzero(as_tuple=True)
    tail = torch.where(keep, torch.zeros_like(p), p).sum(-1)
    lo, hi = d.esap_sparse(lq, rows, ids, p[keep], tail)
    exact = _plain_esap(lp, lq).float()
    assert torch.all(lo <= exact) and torch.all(exact <= hi)
    assert torch.all(hi - lo <= tail + 2 * d.FP32_SLACK + 1e-6)


def test_exact_terms_match_plain_formulas():
    g = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(5, 50, generator=g) * 3, torch.randn(5, 50, generator=g) * 3
    logp = torch.log_softmax(lp, -1)
    p, q = torch.softmax(lp.double(), -1), torch.softmax(lq.double(), -1)
    targets = torch.tensor([0, 7, 49, 3, 3])
    assert torch.allclose(d.esap_exact(lq, logp)[0].double(), torch.minimum(p, q).sum(-1), atol=1e-6)
    assert torch.allclose(d.kl_pq(lq, logp)[0].double(), (p * (p.log() - q.log())).sum(-1), atol=1e-5)
    assert torch.allclose(d.kl_qp(lq, logp)[0].double(), (q * (q.log() - p.log())).sum(-1), atol=1e-5)
    assert torch.allclose(d.nll(lq, targets)[0].double(), -q.log()[torch.arange(5), targets], atol=1e-5)
    assert torch.equal(d.esap_exact(lp, logp)[0], d.esap_exact(lp, logp)[1])


def test_bf16_logits_are_scored_in_fp32():
    g = torch.Generator().manual_seed(1)
    lp, lq = torch.randn(4, 1000, generator=g), torch.randn(4, 1000, generator=g)
    logp = torch.log_softmax(lp.bfloat16().float(), -1)
    v, _ = d.esap_exact(lq.bfloat16(), logp)
    assert v.dtype == torch.float32
    assert torch.allclose(v.double(), _plain_esap(lp.bfloat16().float(), lq.bfloat16().float()), atol=1e-6)


@pytest.mark.parametrize("tol", [0.0, 1e-4, 1e-2])
def test_sparse_teacher_meets_tolerance_and_shrinks(tol):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (3, 40), generator=g)
    score = torch.rand(3, 40, generator=g) < 0.7
    batches = list(TokenSet(ids, torch.ones_like(ids), score).batches(2))
    logits = [torch.randn(len(b), 40, 512, generator=g) * 4 for b in batches]
    t = build_teacher(lambda i, b: logits[i], batches, "sparse", tol, "m", "t", 2)
    exact = build_teacher(lambda i, b: logits[i], batches, "exact", tol, "m", "t", 2)
    assert t.num_scored == exact.num_scored == int(score[:, :-1].sum())
    assert t.mean_tail <= tol + 1e-9
    assert t.nbytes <= exact.nbytes                      # never larger than the full table (falls back to it)
    assert (t.mode == "sparse") == (tol >= 1e-2)         # these random logits are flat: 1e-4 needs most entries
    for c in t.chunks if t.mode == "sparse" else []:      # stored probabilities + tail account for all of p at each position
        mass = torch.zeros(c.counts.shape[0]).index_add_(0, c.rows, c.probs) + c.tail
        assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)


def test_teacher_roundtrips_through_safetensors(tmp_path):
    ids = torch.randint(0, 64, (2, 9))
    batches = list(TokenSet(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)).batches(2))
    logits = torch.randn(2, 9, 64) * 10          # peaked enough for a sparse cache
    t = build_teacher(lambda i, b: logits, batches, "sparse", 1e-3, "m", "t", 2)
    back = type(t).load(t.save(tmp_path / "teacher.safetensors"))
    assert t.mode == "sparse"
    assert (back.mode, back.tolerance, back.model_fingerprint, back.nbytes) == (t.mode, t.tolerance, "m", t.nbytes)
    assert torch.equal(back.chunks[0].rows, t.chunks[0].rows) and torch.equal(back.chunks[0].probs, t.chunks[0].probs)


def test_registry_names_directions_and_unknown_name():
    assert {n: o.direction for n, o in OBJECTIVES.items()} == {
        "esap": "maximize", "kl_pq": "minimize", "kl_qp": "minimize", "nll": "minimize"}
    with pytest.raises(AllocoptError, match="esap, kl_pq, kl_qp, nll"):
        get_objective("sap")
