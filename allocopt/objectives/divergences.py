"""Per-position agreement between the full model p and a pruned model q, in fp32.

Every function takes the candidate's *logits* at scored positions ([n, V], any dtype) and returns two
fp32 vectors ``(lo, hi)`` of length n: a certified interval for the per-position term (lo == hi when the
teacher is exact). Logits are cast to fp32 before ``log_softmax`` because bf16 softmax/min/sum is what
made the reference ESAP noisy (spec evoesap 2.2).

    ESAP_t = sum_v min(p_v, q_v) = 1 - TV(p, q)        (speculative-decoding acceptance, maximise)
    KL(p||q), KL(q||p)                                   (minimise; need the exact teacher)
    NLL_t = -log q(x_{t+1})                              (minimise; needs no teacher)

Sparse teacher (top ids/probs of p per position + excluded mass t_p): with S the stored ids,
    lo = sum_{v in S} min(p_v, q_v) <= ESAP_t <= lo + min(t_p, t_q) = hi,   t_q = 1 - sum_{v in S} q_v,
because every excluded term min(p_v, q_v) is bounded by both p_v and q_v.
"""
from __future__ import annotations

import torch

# Widening of the sparse ESAP interval that covers fp32 rounding of the sums on both sides (the bound is
# compared with an fp32 full-vocab sum, whose own rounding over V terms is ~1e-7..1e-6).
FP32_SLACK = 2e-6


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def esap_exact(logits: torch.Tensor, logp: torch.Tensor, p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``p`` = ``logp.exp()`` when the caller keeps it (the teacher cache does: one pass less per candidate)."""
    v = torch.minimum(logp.exp() if p is None else p, torch.softmax(logits.float(), dim=-1)).sum(-1)
    return v, v


def esap_sparse(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows``/``ids``/``probs`` are flat (ragged) entries of p; ``tail`` [n] is p's excluded mass per position."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    q = (logits[rows, ids] - lse[rows]).exp()
    n = logits.shape[0]
    lo = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add_(0, rows, torch.minimum(probs, q))
    q_in = torch.zeros_like(lo).index_add_(0, rows, q)
    tail_q = (1.0 - q_in).clamp_min(0.0)
    hi = (lo + torch.minimum(tail, tail_q) + FP32_SLACK).clamp_max(1.0)
    return (lo - FP32_SLACK).clamp_min(0.0), hi


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v (log a_v - log b_v), with 0 log 0 = 0."""
    a = logp_a.exp()
    return torch.where(a > 0, a * (logp_a - logp_b), torch.zeros_like(a)).sum(-1)


def kl_pq(logits: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = _kl(logp, log_probs(logits))
    return v, v


def kl_qp(logits: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = _kl(log_probs(logits), logp)
    return v, v


def nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = -log_probs(logits).gather(-1, targets[:, None]).squeeze(-1)
    return v, v
