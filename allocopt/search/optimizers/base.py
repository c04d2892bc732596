"""What every optimizer receives and returns; optimizers only ever see plans as count vectors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.search.fidelity import Fidelity
from allocopt.search.problem import EvaluationCache
from allocopt.search.space import AllocationSpace


@dataclass
class SearchContext:
    space: AllocationSpace
    evaluate: Callable[[np.ndarray], np.ndarray]     # counts [n, L] -> values [n] (higher is better; NaN = failed)
    seed: int
    max_evals: int                                   # budget in full-fidelity evaluation equivalents (see fidelity)
    population: int
    ranking: dict[int, list[int]]                    # best-first expert ids per layer
    scores: dict[int, np.ndarray]                    # criterion scores per layer (for `global`)
    stats: Any = None                                # RoutingStats (for `grape`: similarity[layer] [E, E])
    on_generation: Callable[[float, float], None] | None = None   # (equivalents spent, best value so far)
    options: dict = field(default_factory=dict)
    expert_space: AllocationSpace | None = None      # ``space`` counted in experts when it counts in units (groups)
    fidelity: Fidelity | None = None                 # partial scores on the first search rows (racing); None: none

    @property
    def experts(self) -> AllocationSpace:
        """The space in experts: what rankings, scores and similarities index (``space`` itself without groups)."""
        return self.expert_space if self.expert_space is not None else self.space

    def to_units(self, x: np.ndarray) -> np.ndarray:
        """An allocation computed in experts (global ranking, GRAPE) -> the nearest point ``space`` searches."""
        return self.experts.project(x) if self.experts is not self.space else np.asarray(x)

    def cache(self, probes: bool = False) -> EvaluationCache:
        """The evaluation cache of one search; ``probes`` when the search also evaluates plans off the budget
        (sensitivity probes), so progress reports only count plans on it."""
        return EvaluationCache(self.evaluate, self.max_evals, self.on_generation, self.fidelity,
                               budget=self.space.budget if probes else None)


@dataclass
class SearchResult:
    best: np.ndarray
    best_value: float
    evaluations: int                                 # plans evaluated at full fidelity
    history: list[tuple[np.ndarray, float]]
    front: list[tuple[np.ndarray, float, int]] | None = None
    spent: float = 0.0                               # full-fidelity evaluation equivalents (partial rows included)
    pruned: int = 0                                  # plans that lost a race (PRUNED trials)


class Optimizer(Protocol):
    """Optional class attributes the runner reads: ``fixed_allocation = True`` marks a search-free allocation
    (uniform, global, grape), reported as it is instead of falling back to uniform; ``memory_objective = True``
    makes the study two-objective (objective, memory_bytes), as NSGA-II's front needs; ``races(options) -> bool``
    says the optimizer races candidates on partial fidelity when ``ctx.fidelity`` allows (the runner reports when
    it cannot); ``check(space, max_evals, options)`` refuses bad options or a budget too small with one
    AllocoptError before the model loads (``space`` may be None when only the loaded model tells it)."""

    name: str

    def run(self, ctx: SearchContext) -> SearchResult: ...


def result_from(cache: EvaluationCache, front: list[tuple[np.ndarray, float, int]] | None = None,
                budget: int | None = None) -> SearchResult:
    """The best plan the cache evaluated (only plans summing to ``budget`` when given: sensitivity probes are
    evaluated off the budget and never returned)."""
    best, value = cache.best(budget)
    if not np.isfinite(value):
        raise AllocoptError(f"all {cache.evaluations} evaluated plans failed (NaN objective); check the objective "
                            "log above and the model/data settings")
    return SearchResult(best, value, cache.evaluations, list(cache.history), front, cache.spent, len(cache.pruned))


_EXAMPLES = {int: 4, float: 0.5, bool: "true", str: "name"}     # a value of the kind, for options without a default


def option(options: dict, key: str, kind: type, default, choices: tuple | None = None):
    """``options[key]`` as ``kind`` (int, float, bool or str), else ``default``; one-line AllocoptError otherwise."""
    if key not in options or options[key] is None:
        return default
    value = options[key]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return text in ("true", "1", "yes", "on")
        out = kind(value)
    except (TypeError, ValueError):
        example = default if default is not None else _EXAMPLES.get(kind, "...")
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise AllocoptError(f"--option {key}={value!r} is not {article} {kind.__name__}; e.g. --option {key}={example}"
                            ) from None
    if choices is not None and out not in choices:
        raise AllocoptError(f"--option {key}={value!r} must be one of {', '.join(map(str, choices))}")
    return out


def check_at_least(options: dict, minimums: dict[str, int]) -> None:
    """Each integer option in ``minimums`` that is given parses and is at least its minimum; one-line
    AllocoptError otherwise."""
    for key, low in minimums.items():
        value = option(options, key, int, None)
        if value is not None and value < low:
            raise AllocoptError(f"--option {key}={value} must be >= {low}; raise it")
