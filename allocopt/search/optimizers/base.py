"""What every optimizer is, receives and returns; optimizers only ever see plans as count vectors."""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.search.optimizers.options import NoOptions, check_options_class, parse_options

if TYPE_CHECKING:                 # the registry imports this module; pymoo (via problem) loads with an optimizer
    from allocopt.search.fidelity import Fidelity, RowGrid
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
    options: dict = field(default_factory=dict)      # raw --option values (text or TOML); the optimizer parses them
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
        from allocopt.search.problem import EvaluationCache

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
    phases: dict[str, dict[str, float]] = field(default_factory=dict)   # cost of each part (EvaluationCache.phase)


class Optimizer(ABC):
    """An allocation search: ``run(ctx) -> SearchResult`` over count vectors, with options and capabilities declared
    on the class, which the runner reads before and after the search.

        class Anneal(Optimizer):
            name = "anneal"

            @dataclass(frozen=True)
            class Options:
                steps: int = option(defaults.ANNEAL_STEPS, at_least=1)

            def run(self, ctx):
                opts = self.parse(ctx.options)           # once, at the top: Options(steps=...)
                ...

    Capabilities: ``fixed_allocation`` marks a search-free allocation (uniform, global, grape), reported as it is
    instead of falling back to uniform; ``memory_objective`` makes the study two-objective (objective,
    memory_bytes), as NSGA-II's front needs; ``uses_population`` says ``ctx.population`` sizes its generations (a
    ``--population`` given to any other is reported as changing nothing); ``races(options)`` says the optimizer
    races candidates on partial fidelity when ``ctx.fidelity`` allows (the runner reports when it cannot);
    ``check(space, max_evals, options)`` refuses bad options or a budget too small with one AllocoptError before
    the model loads (``space`` may be None when only the loaded model tells it), and ``check_budget(space,
    max_evals, options, fidelity)`` once the search set's rows are known, before anything is written."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    fixed_allocation: ClassVar[bool] = False
    memory_objective: ClassVar[bool] = False
    uses_population: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_options_class(cls.Options)
        for attr in ("fixed_allocation", "memory_objective", "uses_population"):
            if not isinstance(getattr(cls, attr), bool):
                raise TypeError(f"{cls.__qualname__}.{attr} must be True or False")
        declared = set(dir(Optimizer))
        for attr in vars(cls):                 # a misspelt capability would otherwise be silently ignored
            close = difflib.get_close_matches(attr, _CAPABILITIES, n=1, cutoff=0.85)
            if close and attr not in declared and not attr.startswith("_"):
                raise TypeError(f"{cls.__qualname__}.{attr} is not an Optimizer attribute; did you mean {close[0]}?")

    def parse(self, options: Mapping[str, Any] | None) -> Any:
        """``options`` (``ctx.options``: text or TOML values) as this optimizer's typed ``Options``."""
        return parse_options(self.Options, options, self.name)

    def races(self, options: Mapping[str, Any]) -> bool:
        """Whether a search with these options races candidates on partial fidelity."""
        return False

    def check(self, space: AllocationSpace | None, max_evals: int, options: Mapping[str, Any]) -> None:
        """One AllocoptError line for options that do not parse, or a budget that pays for no search (the uniform
        plan alone; where an optimizer adds it, a budget too small for ``space``), before any weights load."""
        self.parse(options)
        if not self.fixed_allocation and max_evals < MIN_SEARCH_EVALS:
            raise AllocoptError(f"{self.name} needs at least {MIN_SEARCH_EVALS} evaluations (the uniform plan and one "
                                f"other), got --evals {max_evals}; raise --evals (or use --optimizer uniform)")

    def check_budget(self, space: AllocationSpace, max_evals: int, options: Mapping[str, Any],
                     fidelity: RowGrid | None) -> None:
        """One AllocoptError line for a budget that cannot pay for the search once its search set is known
        (``fidelity``: its rows and micro-batch step; None where every plan is scored on all rows), called by the
        runner before the study is written. Default: nothing more than :meth:`check`."""
        return None

    @abstractmethod
    def run(self, ctx: SearchContext) -> SearchResult: ...


MIN_SEARCH_EVALS = 2       # a search evaluates the uniform plan and at least one other

_CAPABILITIES = ("name", "Options", "fixed_allocation", "memory_objective", "uses_population", "races", "check",
                 "check_budget", "parse", "run")


def result_from(cache: EvaluationCache, front: list[tuple[np.ndarray, float, int]] | None = None,
                budget: int | None = None) -> SearchResult:
    """The best plan the cache evaluated (only plans summing to ``budget`` when given: sensitivity probes are
    evaluated off the budget and never returned)."""
    best, value = cache.best(budget)
    if not np.isfinite(value):
        raise AllocoptError(f"all {cache.evaluations} evaluated plans failed (NaN objective); check the objective "
                            "log above and the model/data settings")
    return SearchResult(best, value, cache.evaluations, list(cache.history), front, cache.spent, len(cache.pruned),
                        {k: {m: round(v, 4) for m, v in row.items()} for k, row in cache.phases.items()})
