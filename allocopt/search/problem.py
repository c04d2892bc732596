"""The expensive objective as seen by the optimizers: a distinct-plan cache with an evaluation budget, and a
vectorised pymoo Problem on top of it (one ``evaluate`` call per population = one batched forward pass)."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
from pymoo.core.problem import Problem

from allocopt.errors import AllocoptError
from allocopt.search.fidelity import Fidelity, Score
from allocopt.search.space import AllocationSpace


class EvaluationCache:
    """Evaluates only plans never seen before, within a budget of full-fidelity evaluation equivalents.

    A plan evaluated on all search rows costs 1; with multi-fidelity (``fidelity``, racing) a plan scored on r of
    R rows costs r / R, and raising it to more rows costs only the rows added. Without racing the budget is the
    number of distinct plans, as before. Rows beyond the budget come back as NaN without being evaluated and set
    ``exhausted``; optimizers stop then. Plans that lost a race (``prune``) stay known as NaN, so they are never
    raced again. ``on_generation(equivalents spent, best)`` fires after every batch evaluated at full fidelity.
    ``feasible`` (plan -> bool) limits what counts as the best to plans a search may return, where it also
    evaluates plans outside its space (the joint search's DP probes above the byte budget).
    """

    def __init__(self, evaluate: Callable[[np.ndarray], np.ndarray], max_evals: int,
                 on_generation: Callable[[float, float], None] | None = None, fidelity: Fidelity | None = None,
                 budget: int | None = None, feasible: Callable[[np.ndarray], bool] | None = None):
        if max_evals < 1:
            raise AllocoptError(f"the evaluation budget must be at least 1 (got {max_evals}); raise --evals")
        self._evaluate, self.max_evals, self.on_generation = evaluate, max_evals, on_generation
        self.fidelity, self.budget = fidelity, budget       # budget: what on_generation's best must sum to
        self.feasible = feasible
        self.values: dict[tuple[int, ...], float] = {}
        self.history: list[tuple[np.ndarray, float]] = []
        self.scores: dict[tuple[int, ...], Score] = {}       # the most rows each raced plan has been scored on
        self.pruned: dict[tuple[int, ...], None] = {}         # raced out, in order (a dict as an ordered set)
        self.spent = 0.0                                      # full-fidelity evaluation equivalents
        self.exhausted = False
        self.phases: dict[str, dict[str, float]] = {}         # what each part of a search cost (``phase``)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Charge what is evaluated inside to ``name`` in ``phases`` (equivalents, plans at full fidelity, seconds),
        so a search reports what each of its parts cost (the DP warm start against the generations)."""
        spent, plans, start = self.spent, self.evaluations, time.perf_counter()
        try:
            yield
        finally:
            row = self.phases.setdefault(name, {"equivalents": 0.0, "evaluations": 0, "seconds": 0.0})
            row["equivalents"] += self.spent - spent
            row["evaluations"] += self.evaluations - plans
            row["seconds"] += time.perf_counter() - start

    @property
    def evaluations(self) -> int:
        """Plans evaluated at full fidelity."""
        return len(self.history)

    @property
    def remaining(self) -> float:
        return self.max_evals - self.spent

    @property
    def rows(self) -> int:
        return self.fidelity.rows if self.fidelity is not None else 1

    def _rows_done(self, key: tuple[int, ...]) -> int:
        if key in self.values:
            return self.rows
        score = self.scores.get(key)
        return score.rows if score is not None else 0

    def _affordable(self, keys: list[tuple[int, ...]], rows: int) -> list[tuple[int, ...]]:
        """The prefix of ``keys`` whose cost fits the budget; sets ``exhausted`` when some do not fit."""
        out, budget = [], self.remaining + 1e-9
        for key in keys:
            cost = max(0, rows - self._rows_done(key)) / self.rows
            if cost > budget:
                self.exhausted = True
                break
            budget -= cost
            out.append(key)
        return out

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.int64))
        keys = [tuple(int(v) for v in x) for x in X]
        misses = self._affordable(list(dict.fromkeys(k for k in keys if k not in self.values and k not in self.pruned)),
                                  self.rows)
        if misses:
            values = np.asarray(self._evaluate(np.array(misses, dtype=np.int64)), dtype=float).reshape(-1)
            for key, value in zip(misses, values):
                self.spent += (self.rows - self._rows_done(key)) / self.rows
                self.values[key] = float(value)
                self.scores.pop(key, None)
                self.history.append((np.array(key, dtype=np.int64), float(value)))
            if self.on_generation is not None:
                self.on_generation(self.spent, self.best(self.budget)[1])
        if self.remaining <= 1e-9:
            self.exhausted = True
        return np.array([self.values.get(k, np.nan) for k in keys])

    def score(self, X: np.ndarray, rows: int) -> list[Score | None]:
        """Partial scores on the first ``rows`` rows (needs ``fidelity``); None for plans the budget cannot pay."""
        if self.fidelity is None:
            raise AllocoptError("this search has no multi-fidelity scoring (racing needs a single-process run); "
                                "turn racing off with --option racing=false")
        X = np.atleast_2d(np.asarray(X, dtype=np.int64))
        keys = [tuple(int(v) for v in x) for x in X]
        rows = min(int(rows), self.rows)
        todo = self._affordable(list(dict.fromkeys(keys)), rows)
        out: dict[tuple[int, ...], Score] = {}
        if todo:
            for key, score in zip(todo, self.fidelity.score(np.array(todo, dtype=np.int64), rows)):
                self.spent += max(0, score.rows - self._rows_done(key)) / self.rows
                if key not in self.values:
                    self.scores[key] = score
                out[key] = score
        if self.remaining <= 1e-9:
            self.exhausted = True
        return [out.get(k) for k in keys]

    def prune(self, X: np.ndarray) -> None:
        """Plans that lost a race: PRUNED trials, never raced or evaluated again by this search."""
        keys = [k for k in dict.fromkeys(tuple(int(v) for v in x) for x in np.atleast_2d(np.asarray(X, dtype=np.int64)))
                if k in self.scores and k not in self.pruned]
        if keys and self.fidelity is not None:
            self.fidelity.prune(np.array(keys, dtype=np.int64))
        self.pruned.update(dict.fromkeys(keys))

    def best(self, budget: int | None = None) -> tuple[np.ndarray, float]:
        """The best full value so far among feasible plans (summing to ``budget`` when given); NaN when there is
        none."""
        finite = [(x, v) for x, v in self.history if np.isfinite(v) and (budget is None or int(x.sum()) == budget)
                  and (self.feasible is None or self.feasible(x))]
        if not finite:
            return np.array([], dtype=np.int64), float("nan")
        return max(finite, key=lambda item: item[1])


class AllocationProblem(Problem):
    """pymoo minimises: F = -value (failed/unevaluated/raced-out -> +inf); with ``n_obj=2`` also memory bytes.

    ``evaluate`` replaces the cache's full evaluation of a batch (racing: ``lambda X: race(cache, X, schedule)``).
    """

    def __init__(self, space: AllocationSpace, cache: EvaluationCache, n_obj: int = 1,
                 evaluate: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(n_var=space.size, n_obj=n_obj, xl=space.lower.astype(float),
                         xu=space.upper.astype(float), vtype=int)
        self.space, self.cache, self.evaluate_batch = space, cache, evaluate or cache

    def _evaluate(self, X, out, *args, **kwargs):
        X = np.asarray(X).astype(np.int64)
        values = self.evaluate_batch(X)
        loss = np.where(np.isfinite(values), -values, np.inf)
        out["F"] = loss[:, None] if self.n_obj == 1 else np.column_stack([loss, self.space.memory_bytes(X)])


# Batches in a row that produce no new plan before a search is considered converged (tiny or exhausted spaces).
MAX_STALLS = 25


def drive(algorithm, problem: AllocationProblem, seed: int, max_stalls: int = MAX_STALLS,
          stop: Callable[[], bool] | None = None) -> None:
    """Ask/tell loop until the budget is spent, the search stops producing new plans, or ``stop()`` says so
    (checked after every generation: e.g. a stagnation rule that restarts the search)."""
    from pymoo.core.termination import NoTermination

    algorithm.setup(problem, termination=NoTermination(), seed=seed)
    stalls = 0
    while not problem.cache.exhausted and stalls < max_stalls:
        before = problem.cache.spent
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:
            break
        algorithm.evaluator.eval(problem, pop)
        stalls = stalls + 1 if problem.cache.spent == before else 0
        algorithm.tell(infills=pop)
        if stop is not None and stop():
            break
