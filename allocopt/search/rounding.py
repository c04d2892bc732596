"""Integer apportionment: real-valued shares -> integer counts in [lo, hi] with an exact total.

Used for the uniform plan, the EvoESAP init patterns and the Optuna simplex parametrisation, so that every
continuous proposal maps to a feasible allocation without rejection.
"""
from __future__ import annotations

import numpy as np


def largest_remainder(weights: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Split ``total`` proportionally to ``weights`` (Hamilton rounding), clipped to ``[lo, hi]``.

    Deterministic: ties go to the lower index. Requires ``sum(lo) <= total <= sum(hi)``.
    """
    w = np.maximum(np.asarray(weights, dtype=float), 0.0)
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(f"total {total} outside [{lo.sum()}, {hi.sum()}]")
    if w.sum() <= 0:
        w = np.ones_like(w)
    target = total * w / w.sum()
    x = np.clip(np.floor(target).astype(np.int64), lo, hi)
    while (diff := total - int(x.sum())) != 0:
        if diff > 0:
            priority = np.where(x < hi, target - x, -np.inf)
        else:
            priority = np.where(x > lo, x - target, -np.inf)
        order = np.argsort(-priority, kind="stable")[: abs(diff)]
        order = order[np.isfinite(priority[order])]
        x[order] += 1 if diff > 0 else -1
    return x
