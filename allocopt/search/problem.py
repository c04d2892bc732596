"""The expensive objective as seen by the optimizers: a distinct-plan cache with an evaluation budget, and a
vectorised pymoo Problem on top of it (one ``evaluate`` call per population = one batched forward pass)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from pymoo.core.problem import Problem

from allocopt.errors import AllocoptError
from allocopt.search.space import AllocationSpace


class EvaluationCache:
    """Evaluates only plans never seen before, at most ``max_evals`` of them, and keeps the history.

    Rows beyond the budget come back as NaN without being evaluated and set ``exhausted``; optimizers stop
    then. ``on_generation(evaluations, best)`` fires after every batch that evaluated something.
    """

    def __init__(self, evaluate: Callable[[np.ndarray], np.ndarray], max_evals: int,
                 on_generation: Callable[[int, float], None] | None = None):
        if max_evals < 1:
            raise AllocoptError(f"the evaluation budget must be at least 1 (got {max_evals}); raise --evals")
        self._evaluate, self.max_evals, self.on_generation = evaluate, max_evals, on_generation
        self.values: dict[tuple[int, ...], float] = {}
        self.history: list[tuple[np.ndarray, float]] = []
        self.exhausted = False

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int:
        return self.max_evals - self.evaluations

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.int64))
        keys = [tuple(int(v) for v in x) for x in X]
        misses = list(dict.fromkeys(k for k in keys if k not in self.values))
        if len(misses) > self.remaining:
            misses, self.exhausted = misses[: self.remaining], True
        if misses:
            values = np.asarray(self._evaluate(np.array(misses, dtype=np.int64)), dtype=float).reshape(-1)
            for key, value in zip(misses, values):
                self.values[key] = float(value)
                self.history.append((np.array(key, dtype=np.int64), float(value)))
            if self.on_generation is not None:
                self.on_generation(self.evaluations, self.best()[1])
        if self.remaining == 0:
            self.exhausted = True
        return np.array([self.values.get(k, np.nan) for k in keys])

    def best(self) -> tuple[np.ndarray, float]:
        finite = [(x, v) for x, v in self.history if np.isfinite(v)]
        if not finite:
            return np.array([], dtype=np.int64), float("nan")
        return max(finite, key=lambda item: item[1])


class AllocationProblem(Problem):
    """pymoo minimises: F = -value (failed/unevaluated -> +inf); with ``n_obj=2`` also memory bytes."""

    def __init__(self, space: AllocationSpace, cache: EvaluationCache, n_obj: int = 1):
        super().__init__(n_var=space.size, n_obj=n_obj, xl=space.lower.astype(float),
                         xu=space.upper.astype(float), vtype=int)
        self.space, self.cache = space, cache

    def _evaluate(self, X, out, *args, **kwargs):
        X = np.asarray(X).astype(np.int64)
        values = self.cache(X)
        loss = np.where(np.isfinite(values), -values, np.inf)
        out["F"] = loss[:, None] if self.n_obj == 1 else np.column_stack([loss, self.space.memory_bytes(X)])


# Batches in a row that produce no new plan before a search is considered converged (tiny or exhausted spaces).
MAX_STALLS = 25


def drive(algorithm, problem: AllocationProblem, seed: int, max_stalls: int = MAX_STALLS) -> None:
    """Ask/tell loop until the distinct-evaluation budget is spent (or the search stops producing new plans)."""
    from pymoo.core.termination import NoTermination

    algorithm.setup(problem, termination=NoTermination(), seed=seed)
    stalls = 0
    while not problem.cache.exhausted and stalls < max_stalls:
        before = problem.cache.evaluations
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:
            break
        algorithm.evaluator.eval(problem, pop)
        stalls = stalls + 1 if problem.cache.evaluations == before else 0
        algorithm.tell(infills=pop)
