"""The default search: a steady elitist GA that works as a local search around the uniform plan.

Why these choices (optimizers.md §4.3, measured with benchmarks/search_efficiency.py):
the optimum sits near uniform and step size matters more than the library, so generation 0 is the uniform
plan plus level-switch neighbours of it (not random compositions far away), mutation moves up to
``mutation_max_delta`` experts scaled with the layer width, two-point crossover recombines good per-layer
moves found by different parents (BudgetRepair restores the sum), and (mu + lambda) survival keeps elites.
Small batches (8 offspring, 4 elites) let improvements compound quickly; on the 24x64 toy this reaches
EvoESAP's final best after 300 evaluations in about 60 (see the benchmark). ``ctx.population`` is not used:
pass ``options["offspring"]`` for bigger GPU batches.
"""
from __future__ import annotations

import numpy as np
from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.operators.crossover.pntx import TwoPointCrossover

from allocopt import defaults
from allocopt.search.mutation import LevelSwitchMutation
from allocopt.search.optimizers.base import SearchContext, SearchResult, result_from
from allocopt.search.problem import AllocationProblem, drive
from allocopt.search.repair import BudgetRepair
from allocopt.search.sampling import NeighbourhoodSampling


def default_step(space) -> int:
    """Move size: at least EvoESAP's 4, and ~1/8 of a mean layer so wide layers still move fast enough."""
    return max(defaults.MUTATION_MAX_DELTA, int(round(float(np.mean(space.num_experts)) / 8)))


class GeneticSearch:
    name = "ga"

    def run(self, ctx: SearchContext) -> SearchResult:
        opt, space = ctx.options, ctx.space
        offspring = max(2, int(opt.get("offspring", defaults.GA_OFFSPRING)))
        survivors = max(2, int(opt.get("elites", defaults.GA_ELITES)))
        dmax = int(opt.get("mutation_max_delta", default_step(space)))
        algorithm = GA(pop_size=survivors, n_offsprings=offspring,
                       sampling=NeighbourhoodSampling(space.uniform(), dmax),
                       crossover=TwoPointCrossover(prob=float(opt.get("crossover_prob", defaults.GA_CROSSOVER_PROB))),
                       mutation=LevelSwitchMutation(tmax=int(opt.get("mutation_max_moves", defaults.MUTATION_MAX_MOVES)),
                                                    dmax=dmax),
                       repair=BudgetRepair(space.budget), eliminate_duplicates=True)
        cache = ctx.cache()
        drive(algorithm, AllocationProblem(space, cache), ctx.seed)
        return result_from(cache)
