"""Integer apportionment: real-valued shares -> integer counts in [lo, hi] with an exact total.

``largest_remainder`` is used for the uniform plan, the EvoESAP init patterns and the Optuna simplex
parametrisation, so that every continuous proposal maps to a feasible allocation without rejection;
``dp_allocate`` is the exact minimum of a per-layer cost under the total (the sensitivity DP's knapsack, and the
nearest plan of allowed counts in ``AllocationSpace.snap``).
"""
from __future__ import annotations

import math

import numpy as np

from allocopt.errors import AllocoptError


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


def dp_allocate(costs: list[np.ndarray], lower: np.ndarray, upper: np.ndarray, budget: int) -> np.ndarray:
    """Exact minimum of ``sum_l costs[l][x_l - lower_l]`` subject to ``sum_l x_l == budget`` and the bounds.

    Dynamic programming over layers and partial sums (a multiple-choice knapsack), O(L * budget * counts) with
    numpy over the budget axis. Ties go to the smaller count in earlier layers. Raises AllocoptError when the budget
    is infeasible.
    """
    lower, upper = np.asarray(lower, dtype=np.int64), np.asarray(upper, dtype=np.int64)
    if not int(lower.sum()) <= budget <= int(upper.sum()):
        raise AllocoptError(f"budget {budget} is outside {int(lower.sum())}..{int(upper.sum())}; fix the sparsity")
    best = np.full(budget + 1, math.inf)
    best[0] = 0.0
    choice = []
    for layer, cost in enumerate(costs):
        new = np.full(budget + 1, math.inf)
        pick = np.zeros(budget + 1, dtype=np.int64)
        for c in range(int(lower[layer]), int(upper[layer]) + 1):
            if c > budget:
                break
            if cost[c - lower[layer]] == math.inf:            # never chosen: skip the work (counts not allowed)
                continue
            cand = np.full(budget + 1, math.inf)
            cand[c:] = best[: budget + 1 - c] + cost[c - lower[layer]]
            better = cand < new
            new[better], pick[better] = cand[better], c
        best = new
        choice.append(pick)
    x, s = np.zeros(len(costs), dtype=np.int64), budget
    for layer in range(len(costs) - 1, -1, -1):
        x[layer] = choice[layer][s]
        s -= x[layer]
    return x
