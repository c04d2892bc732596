"""Budget repair: any integer vector -> the nearest-ish feasible allocation (bounds hold, sum == budget).

pymoo treats an equality as a constraint violation and wastes most evaluations on infeasible points
(optimizers.md §4.1), so every candidate is repaired after mating and at initialisation instead.
"""
from __future__ import annotations

import numpy as np
from pymoo.core.repair import Repair

Budget = int | tuple[int, int]


def repair_counts(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: Budget,
                  rng: np.random.Generator) -> np.ndarray:
    """Round and clip to the bounds, then add/remove single experts on random layers with slack.

    ``budget`` is an exact total or a (min, max) range (the sum is then only clipped into the range).
    """
    x = np.clip(np.rint(np.asarray(x, dtype=float)).astype(np.int64), lower, upper)
    target = int(np.clip(x.sum(), *budget)) if isinstance(budget, tuple) else int(budget)
    if not int(lower.sum()) <= target <= int(upper.sum()):
        raise ValueError(f"budget {target} outside [{lower.sum()}, {upper.sum()}]")
    while (diff := target - int(x.sum())) != 0:
        slack = np.flatnonzero(x < upper) if diff > 0 else np.flatnonzero(x > lower)
        pick = rng.choice(slack, size=min(abs(diff), len(slack)), replace=False)
        x[pick] += 1 if diff > 0 else -1
    return x


class BudgetRepair(Repair):
    """pymoo Repair wrapping :func:`repair_counts`; bounds come from the problem's ``xl``/``xu``."""

    def __init__(self, budget: Budget):
        super().__init__()
        self.budget = budget

    def _do(self, problem, X, random_state=None, **kwargs):
        lower, upper = problem.xl.astype(np.int64), problem.xu.astype(np.int64)
        return np.array([repair_counts(x, lower, upper, self.budget, random_state) for x in X])
