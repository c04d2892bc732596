"""A cheap, real objective over counts for testing and benchmarking search logic (optimizers.md's toy score).

Per-layer saturating gain with random sensitivities plus a neighbour interaction term, so it is
non-separable and its optimum is neither uniform nor at a bound. Values lie in [0, 1], higher is better.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from allocopt.search.space import AllocationSpace


def toy_objective(space: AllocationSpace, seed: int = 0, interaction: float = 0.3
                  ) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 2.0, space.size)
    scale = space.num_experts * rng.uniform(0.1, 0.4, space.size)
    coupling = rng.uniform(-1.0, 1.0, space.size)

    def evaluate(X: np.ndarray) -> np.ndarray:
        frac = np.atleast_2d(X).astype(float) / space.num_experts
        loss = (weight * np.exp(-np.atleast_2d(X) / scale)).sum(1) / weight.sum()
        pair = (coupling[:-1] * frac[:, :-1] * frac[:, 1:]).sum(1) / max(space.size - 1, 1)
        return np.clip(1.0 - loss + interaction * pair - interaction, 0.0, 1.0)

    return evaluate


class ToyRows:
    """A multi-fidelity toy (``SearchContext.fidelity``): row i of plan x scores ``toy(x) + noise_i(x)`` on
    ``tokens`` positions, the noise fixed per (plan, row), so partial scores rank plans like the full value with
    row noise, as ESAP on a few rows does. ``full(X)`` is the pooled value over all rows; ``pruned`` records what
    racing pruned; ``rows_scored`` counts the rows scored (each (plan, row) once, like the engine)."""

    def __init__(self, space: AllocationSpace, rows: int = 16, step: int = 4, noise: float = 0.01, seed: int = 0):
        self.rows, self.step, self.noise, self.seed = rows, step, noise, seed
        self.f = toy_objective(space, seed=seed)
        self.tokens = np.random.default_rng(seed).integers(50, 150, rows)
        self.pruned: list[tuple[int, ...]] = []
        self.scored: dict[tuple[int, ...], int] = {}
        self.rows_scored = 0

    def _row_sums(self, x: np.ndarray, rows: int) -> np.ndarray:
        key = tuple(int(v) for v in x)
        rng = np.random.default_rng([self.seed, *[v + 1 for v in key]])
        per_row = self.f(x[None])[0] + self.noise * rng.standard_normal(self.rows)
        self.rows_scored += max(0, rows - self.scored.get(key, 0))
        self.scored[key] = max(rows, self.scored.get(key, 0))
        return (per_row * self.tokens)[:rows]

    def score(self, counts: np.ndarray, rows: int):
        from allocopt.search.fidelity import Score

        rows = min(self.rows, -(-int(rows) // self.step) * self.step)
        return [Score(rows, self._row_sums(np.asarray(x), rows), self.tokens[:rows]) for x in np.atleast_2d(counts)]

    def prune(self, counts: np.ndarray) -> None:
        self.pruned += [tuple(int(v) for v in x) for x in np.atleast_2d(counts)]

    def full(self, X: np.ndarray) -> np.ndarray:
        return np.array([self.score(x[None], self.rows)[0].value for x in np.atleast_2d(X)])
