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
