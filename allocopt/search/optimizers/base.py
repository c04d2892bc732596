"""What every optimizer receives and returns; optimizers only ever see plans as count vectors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.search.problem import EvaluationCache
from allocopt.search.space import AllocationSpace


@dataclass
class SearchContext:
    space: AllocationSpace
    evaluate: Callable[[np.ndarray], np.ndarray]     # counts [n, L] -> values [n] (higher is better; NaN = failed)
    seed: int
    max_evals: int                                   # distinct plans evaluated
    population: int
    ranking: dict[int, list[int]]                    # best-first expert ids per layer
    scores: dict[int, np.ndarray]                    # criterion scores per layer (for `global`)
    stats: Any = None                                # RoutingStats (for `grape`: similarity[layer] [E, E])
    on_generation: Callable[[int, float], None] | None = None
    options: dict = field(default_factory=dict)
    expert_space: AllocationSpace | None = None      # ``space`` counted in experts when it counts in units (groups)

    @property
    def experts(self) -> AllocationSpace:
        """The space in experts: what rankings, scores and similarities index (``space`` itself without groups)."""
        return self.expert_space if self.expert_space is not None else self.space

    def to_units(self, x: np.ndarray) -> np.ndarray:
        """An allocation computed in experts (global ranking, GRAPE) -> the nearest point ``space`` searches."""
        return self.experts.project(x) if self.experts is not self.space else np.asarray(x)

    def cache(self) -> EvaluationCache:
        return EvaluationCache(self.evaluate, self.max_evals, self.on_generation)


@dataclass
class SearchResult:
    best: np.ndarray
    best_value: float
    evaluations: int
    history: list[tuple[np.ndarray, float]]
    front: list[tuple[np.ndarray, float, int]] | None = None


class Optimizer(Protocol):
    """Optional class attributes the runner reads: ``fixed_allocation = True`` marks a search-free allocation
    (uniform, global, grape), reported as it is instead of falling back to uniform; ``memory_objective = True``
    makes the study two-objective (objective, memory_bytes), as NSGA-II's front needs."""

    name: str

    def run(self, ctx: SearchContext) -> SearchResult: ...


def result_from(cache: EvaluationCache, front: list[tuple[np.ndarray, float, int]] | None = None) -> SearchResult:
    best, value = cache.best()
    if not np.isfinite(value):
        raise AllocoptError(f"all {cache.evaluations} evaluated plans failed (NaN objective); check the objective "
                            "log above and the model/data settings")
    return SearchResult(best, value, cache.evaluations, list(cache.history), front)
