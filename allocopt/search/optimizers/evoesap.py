"""EvoESAP's search, faithfully: elitist (m + (P-m)), mutation-only, level-switch moves, pattern init.

pymoo GA with pop_size=m survivors and P-m offspring per generation reproduces it exactly (optimizers.md
§2.4b): generation 0 = P plans (uniform + 11 patterns + random), parents drawn uniformly from the top m,
``TwoPointCrossover(prob=0)`` copies them (NoCrossover corrupts pymoo populations, §2.9). Options: ``elites`` (m),
``mutation_max_moves`` (tmax), ``mutation_max_delta`` (dmax), ``mutation_attempts``; P is ``--population`` (at
least the 12 initial plans).
"""
from __future__ import annotations

from dataclasses import dataclass

from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.operators.crossover.pntx import TwoPointCrossover

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.mutation import LevelSwitchMutation
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.optimizers.options import option
from allocopt.search.problem import AllocationProblem, drive
from allocopt.search.sampling import PATTERNS, BudgetSampling
from allocopt.search.selection import TopMRandomSelection


class EvoESAPSearch(Optimizer):
    name = "evoesap"
    uses_population = True           # its generations (batches) are --population plans

    @dataclass(frozen=True)
    class Options:
        elites: int = option(defaults.ELITES, at_least=1)
        mutation_max_moves: int = option(defaults.MUTATION_MAX_MOVES, at_least=1)
        mutation_max_delta: int = option(defaults.MUTATION_MAX_DELTA, at_least=1)
        mutation_attempts: int = option(defaults.MUTATION_ATTEMPTS, at_least=1)

    def run(self, ctx: SearchContext) -> SearchResult:
        opts, space = self.parse(ctx.options), ctx.space
        population = max(int(ctx.population), len(PATTERNS))
        if opts.elites >= population:
            raise AllocoptError(f"evoesap keeps --option elites={opts.elites} of a population of {population}, which "
                                "leaves no offspring; lower elites or raise --population")
        algorithm = GA(pop_size=opts.elites, n_offsprings=population - opts.elites,
                       sampling=BudgetSampling(space.budget, space.num_experts, patterns=True, size=population),
                       selection=TopMRandomSelection(opts.elites), crossover=TwoPointCrossover(prob=0.0),
                       mutation=LevelSwitchMutation(tmax=opts.mutation_max_moves, dmax=opts.mutation_max_delta,
                                                    attempts=opts.mutation_attempts),
                       eliminate_duplicates=True)
        cache = ctx.cache()
        problem = AllocationProblem(space, cache)
        drive(algorithm, problem, ctx.seed)
        return result_from(cache)
