"""EvoESAP's search, faithfully: elitist (m + (P-m)), mutation-only, level-switch moves, pattern init.

pymoo GA with pop_size=m survivors and P-m offspring per generation reproduces it exactly (optimizers.md
§2.4b): generation 0 = P plans (uniform + 11 patterns + random), parents drawn uniformly from the top m,
``TwoPointCrossover(prob=0)`` copies them (NoCrossover corrupts pymoo populations, §2.9).
"""
from __future__ import annotations

from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.operators.crossover.pntx import TwoPointCrossover

from allocopt import defaults
from allocopt.search.mutation import LevelSwitchMutation
from allocopt.search.optimizers.base import SearchContext, SearchResult, result_from
from allocopt.search.problem import AllocationProblem, drive
from allocopt.search.sampling import PATTERNS, BudgetSampling
from allocopt.search.selection import TopMRandomSelection


class EvoESAPSearch:
    name = "evoesap"

    def run(self, ctx: SearchContext) -> SearchResult:
        opt = ctx.options
        population = max(int(ctx.population), len(PATTERNS))
        elites = int(opt.get("elites", defaults.ELITES))
        space = ctx.space
        algorithm = GA(pop_size=elites, n_offsprings=population - elites,
                       sampling=BudgetSampling(space.budget, space.num_experts, patterns=True,
                                                       size=population),
                       selection=TopMRandomSelection(elites), crossover=TwoPointCrossover(prob=0.0),
                       mutation=LevelSwitchMutation(tmax=int(opt.get("mutation_max_moves", defaults.MUTATION_MAX_MOVES)),
                                                    dmax=int(opt.get("mutation_max_delta", defaults.MUTATION_MAX_DELTA)),
                                                    attempts=int(opt.get("mutation_attempts", defaults.MUTATION_ATTEMPTS))),
                       eliminate_duplicates=True)
        cache = ctx.cache()
        problem = AllocationProblem(space, cache)
        drive(algorithm, problem, ctx.seed)
        return result_from(cache)
