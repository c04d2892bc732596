"""Level-switch mutation (EvoPress / EvoESAP): move experts between layers so the total never changes.

T = min(U{1..tmax}, U{1..tmax}) moves (biased to one move), each shifting d ~ U{1..dmax} experts from one
layer to another; a move that would break a bound is redrawn, up to ``attempts`` draws per child.
"""
from __future__ import annotations

import numpy as np
from pymoo.core.mutation import Mutation

from allocopt import defaults


def default_step(space) -> int:
    """Move size: at least EvoESAP's 4, and ~1/8 of a mean layer so wide layers still move fast enough."""
    return max(defaults.MUTATION_MAX_DELTA, int(round(float(np.mean(space.num_experts)) / 8)))


def widest_step(space, first: int) -> int:
    """The largest move worth making: one layer's whole range of kept counts (never below ``first``)."""
    return max(first, int(np.max(space.upper - space.lower)))


def next_step(step: int, first: int, widest: int, improved: bool) -> int:
    """The move step after a stretch of generations: back to ``first`` once the best improved, else doubled up to
    ``widest``, so a converged population looks further out instead of stopping (both GAs' rule)."""
    return first if improved else min(2 * step, widest)


def level_switch(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, rng: np.random.Generator,
                 tmax: int = defaults.MUTATION_MAX_MOVES, dmax: int = defaults.MUTATION_MAX_DELTA,
                 attempts: int = defaults.MUTATION_ATTEMPTS,
                 budget_range: tuple[int, int] | None = None) -> np.ndarray:
    """One mutated copy of ``x``. With ``budget_range`` a move may also add/remove experts (sum stays in range)."""
    x = np.asarray(x, dtype=np.int64).copy()
    moves = min(int(rng.integers(1, tmax + 1)), int(rng.integers(1, tmax + 1)))
    done = tries = 0
    while done < moves and tries < attempts:
        tries += 1
        d = int(rng.integers(1, dmax + 1))
        if budget_range is not None and rng.random() < 0.5:
            layer = int(rng.integers(len(x)))
            step = d if rng.random() < 0.5 else -d
            if lower[layer] <= x[layer] + step <= upper[layer] and \
                    budget_range[0] <= x.sum() + step <= budget_range[1]:
                x[layer] += step
                done += 1
            continue
        src_ok, dst_ok = np.flatnonzero(x > lower), np.flatnonzero(x < upper)
        if len(src_ok) == 0 or len(dst_ok) == 0:
            continue
        src, dst = int(rng.choice(src_ok)), int(rng.choice(dst_ok))
        if src == dst or x[src] - d < lower[src] or x[dst] + d > upper[dst]:
            continue
        x[src] -= d
        x[dst] += d
        done += 1
    return x


class LevelSwitchMutation(Mutation):
    """pymoo wrapper of :func:`level_switch`; always applied (prob=1), bounds from the problem."""

    def __init__(self, tmax: int = defaults.MUTATION_MAX_MOVES, dmax: int = defaults.MUTATION_MAX_DELTA,
                 attempts: int = defaults.MUTATION_ATTEMPTS, budget_range: tuple[int, int] | None = None):
        super().__init__(prob=1.0)
        self.tmax, self.dmax, self.attempts, self.budget_range = tmax, dmax, attempts, budget_range

    def _do(self, problem, X, random_state=None, **kwargs):
        lower, upper = problem.xl.astype(np.int64), problem.xu.astype(np.int64)
        return np.array([level_switch(x, lower, upper, random_state, self.tmax, self.dmax, self.attempts,
                                      self.budget_range) for x in X])
