"""Initial populations: the uniform plan first (so elitism guarantees result >= uniform), then either random
feasible compositions or EvoESAP's 12 structured patterns (evoesap.md §4.2)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from pymoo.core.sampling import Sampling

from allocopt.search.mutation import level_switch
from allocopt.search.repair import Budget, repair_counts
from allocopt.search.rounding import largest_remainder


def random_composition(lower: np.ndarray, upper: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """A random feasible allocation: Dirichlet shares of the free experts above the lower bounds, repaired."""
    share = rng.dirichlet(np.ones(len(lower)))
    return repair_counts(lower + share * (budget - lower.sum()), lower, upper, budget, rng)


def uniform_counts(num_experts: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: int) -> np.ndarray:
    return largest_remainder(num_experts, budget, lower, upper)


# Weights on PRUNED experts per layer (larger = sparser layer), l = 0..L-1; EvoESAP's default patterns.
PATTERNS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "uniform": lambda n, rng: np.ones(n),
    "random": lambda n, rng: rng.random(n),
    "up": lambda n, rng: np.arange(1, n + 1, dtype=float),
    "down": lambda n, rng: np.arange(n, 0, -1, dtype=float),
    "mid": lambda n, rng: 1.0 + np.minimum(np.arange(n), np.arange(n)[::-1]),
    "mid-neg": lambda n, rng: 1.0 + np.abs(np.arange(n) - (n - 1) / 2),
    "front-heavy": lambda n, rng: 0.7 ** np.arange(n),
    "back-heavy": lambda n, rng: 1.3 ** np.arange(n),
    "block-early": lambda n, rng: np.where(np.arange(n) < max(1, n // 4), 2.0, 1.0),
    "block-late": lambda n, rng: np.where(np.arange(n) >= n - max(1, n // 4), 2.0, 1.0),
    "alt": lambda n, rng: np.where(np.arange(n) % 2 == 0, 2.0, 1.0),
    "deep-flat": lambda n, rng: 0.5 + 0.5 * (1 - np.abs(np.arange(n) - (n - 1) / 2) / max((n - 1) / 2, 1)),
}


def pattern_counts(name: str, num_experts: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Kept counts for one EvoESAP pattern: the pruned total is split by the pattern's weights."""
    pruned = largest_remainder(PATTERNS[name](len(lower), rng), int(num_experts.sum()) - budget,
                               num_experts - upper, num_experts - lower)
    return num_experts - pruned


class BudgetSampling(Sampling):
    """Row 0 = uniform plan; then the EvoESAP patterns (if ``patterns``); the rest random compositions.

    With a (min, max) ``budget`` each random row draws its own total in the range (for NSGA-II fronts).
    ``size`` fixes the number of rows whatever pymoo asks for (EvoESAP: P initial rows, m survivors).
    """

    def __init__(self, budget: Budget, num_experts: np.ndarray, uniform_budget: int | None = None,
                 patterns: bool = False, size: int | None = None):
        super().__init__()
        self.budget, self.num_experts, self.patterns, self.size = budget, np.asarray(num_experts), patterns, size
        self.uniform_budget = uniform_budget if uniform_budget is not None else budget

    def _do(self, problem, n_samples, random_state=None, **kwargs):
        lower, upper = problem.xl.astype(np.int64), problem.xu.astype(np.int64)
        n_samples = self.size or n_samples
        rows = [uniform_counts(self.num_experts, lower, upper, self.uniform_budget)]
        if self.patterns:
            rows += [pattern_counts(name, self.num_experts, lower, upper, self.uniform_budget, random_state)
                     for name in PATTERNS if name != "uniform"]
        while len(rows) < n_samples:
            total = self.budget if not isinstance(self.budget, tuple) else int(random_state.integers(
                self.budget[0], self.budget[1] + 1))
            rows.append(random_composition(lower, upper, total, random_state))
        return np.array(rows[:n_samples])


class NeighbourhoodSampling(Sampling):
    """The centres first (uniform, a warm-start plan, the best so far...), then level-switch neighbours of them in
    turn (a local start). A single centre may be given as one vector."""

    def __init__(self, centres: np.ndarray, dmax: int, tmax: int = 3):
        super().__init__()
        self.centres = np.atleast_2d(np.asarray(centres, dtype=np.int64))
        self.dmax, self.tmax = dmax, tmax

    def _do(self, problem, n_samples, random_state=None, **kwargs):
        lower, upper = problem.xl.astype(np.int64), problem.xu.astype(np.int64)
        rows = [c for c in self.centres]
        while len(rows) < n_samples:
            centre = self.centres[(len(rows) - len(self.centres)) % len(self.centres)]
            rows.append(level_switch(centre, lower, upper, random_state, tmax=self.tmax, dmax=self.dmax))
        return np.array(rows[:max(n_samples, len(self.centres))])
