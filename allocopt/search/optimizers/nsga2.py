"""NSGA-II over a range of budgets: maximise the objective, minimise routed-expert memory -> a Pareto front.

The total may vary within ``--option sparsity_range=[lo,hi]`` (fractions of experts removed,
``defaults.NSGA2_SPARSITY_RANGE``); repair clips sums into that range, and the level-switch mutation (moves of up to
``mutation_max_delta`` experts) may also add/remove experts. With equal-sized experts and a fixed
sum, memory would be constant and the front a single point (optimizers.md §2.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.mutation import LevelSwitchMutation
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult
from allocopt.search.optimizers.options import option
from allocopt.search.problem import AllocationProblem, drive
from allocopt.search.repair import BudgetRepair
from allocopt.search.sampling import BudgetSampling
from allocopt.search.space import AllocationSpace


def budget_range(space: AllocationSpace, sparsity_range: tuple[float, float]) -> tuple[int, int]:
    total = int(space.num_experts.sum())
    lo_s, hi_s = sorted(float(s) for s in sparsity_range)
    lo = max(int(space.lower.sum()), total - int(math.floor(hi_s * total + 0.5)))
    hi = min(int(space.upper.sum()), total - int(math.floor(lo_s * total + 0.5)))
    if lo > hi:
        raise AllocoptError(f"sparsity range {sparsity_range} leaves no feasible total between the bounds "
                            f"{int(space.lower.sum())}..{int(space.upper.sum())}; widen the range")
    return lo, max(hi, lo)


class NSGA2Search(Optimizer):
    name = "nsga2"
    uses_population = True           # its generations (batches) are --population plans
    memory_objective = True          # its study records (objective, memory_bytes): a Pareto front, not one value

    @dataclass(frozen=True)
    class Options:
        sparsity_range: tuple[float, float] = option(defaults.NSGA2_SPARSITY_RANGE, at_least=0.0, at_most=1.0)
        mutation_max_delta: int = option(defaults.MUTATION_MAX_DELTA, at_least=1)

    def run(self, ctx: SearchContext) -> SearchResult:
        opts, space = self.parse(ctx.options), ctx.space
        bounds = budget_range(space, opts.sparsity_range)
        uniform_budget = int(np.clip(space.budget, *bounds))
        algorithm = NSGA2(pop_size=max(4, ctx.population),
                          sampling=BudgetSampling(bounds, space.num_experts, uniform_budget=uniform_budget),
                          crossover=TwoPointCrossover(),
                          mutation=LevelSwitchMutation(dmax=opts.mutation_max_delta, budget_range=bounds),
                          repair=BudgetRepair(bounds), eliminate_duplicates=True)
        cache = ctx.cache()
        drive(algorithm, AllocationProblem(space, cache, n_obj=2), ctx.seed)
        done = [(x, v) for x, v in cache.history if np.isfinite(v)]
        if not done:
            raise AllocoptError("every evaluated plan failed (NaN objective); check the objective log above")
        F = np.array([[-v, space.memory_bytes(x)] for x, v in done], dtype=float)
        idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
        front = sorted(((done[i][0], done[i][1], int(F[i, 1])) for i in idx), key=lambda t: t[2])
        at_budget = [(x, v) for x, v in done if int(x.sum()) == space.budget] or done
        best, value = max(at_budget, key=lambda t: t[1])
        return SearchResult(best, value, cache.evaluations, list(cache.history), front, cache.spent, len(cache.pruned))
