"""The default search: a steady elitist GA around the uniform plan, warm-started by the sensitivity DP, with
racing and restarts.

Why these choices (measured with benchmarks/search_efficiency.py on the testbed, studies/reports/search_efficiency.md):
* the optimum sits near uniform and step size matters more than the library (optimizers.md §4.3), so generation 0
  is the uniform plan, the ``dp`` plan (additive model fitted to per-layer probes around uniform, solved exactly,
  re-linearised in a trust region around its own plan while that improves; ``allocopt.search.sensitivity``) and
  level-switch neighbours of both, not random compositions far away;
* two-point crossover recombines per-layer moves found by different parents (BudgetRepair restores the sum),
  level-switch mutation moves up to ``mutation_max_delta`` experts, and (mu + lambda) survival keeps the elites;
* racing (``allocopt.search.racing``, EvoPress's multi-step selection) scores each generation's offspring on the
  first rows of the search set and promotes only the best to all rows, so a generation costs a fraction of its
  plans: more candidates per evaluation budget;
* when the best has not improved for ``patience`` generations the population has converged: the GA restarts
  from the best plan with its neighbours at twice the step, up to a layer's whole range, and back to the first
  step after an improvement (``mutation.next_step``), so it keeps improving; with ``restart=dp`` a restart after a
  fruitless epoch also re-linearises the DP around the best.

Options (``--option KEY=VALUE``; ``GeneticSearch.Options``, defaults in ``allocopt.defaults``): ``racing`` (bool),
``offspring``, ``elites``, ``crossover_prob``, ``mutation_max_delta``, ``mutation_max_moves``, ``warm_start`` (bool:
the DP probes), ``dp_probes``, ``dp_rows``, ``dp_rounds``, ``dp_radius``, ``patience``, ``race_first_rows``,
``race_z``, ``restart`` (``step`` or ``dp``). ``ctx.population`` is not used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.operators.crossover.pntx import TwoPointCrossover

from allocopt import defaults
from allocopt.search.fidelity import check_rows
from allocopt.search.mutation import LevelSwitchMutation, default_step, next_step, widest_step
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.optimizers.dp import MIN_PROBES, SensitivityAllocation, probe_budget, search_options
from allocopt.search.optimizers.options import option
from allocopt.search.problem import AllocationProblem, EvaluationCache, drive
from allocopt.search.racing import RaceSchedule, race, race_schedule
from allocopt.search.repair import BudgetRepair
from allocopt.search.sampling import NeighbourhoodSampling
from allocopt.search.sensitivity import probe_grid, sensitivity_search, sensitivity_step

log = logging.getLogger(__name__)


class GeneticSearch(Optimizer):
    name = "ga"

    @dataclass(frozen=True)
    class Options(SensitivityAllocation.Options):
        racing: bool = option(defaults.GA_RACING)
        offspring: int | None = option(None, at_least=2)            # None: GA_RACE_OFFSPRING racing, else GA_OFFSPRING
        elites: int = option(defaults.GA_ELITES, at_least=2)
        crossover_prob: float = option(defaults.GA_CROSSOVER_PROB, at_least=0.0, at_most=1.0)
        mutation_max_delta: int | None = option(None, at_least=1)   # None: default_step(space)
        mutation_max_moves: int = option(defaults.MUTATION_MAX_MOVES, at_least=1)
        warm_start: bool = option(defaults.GA_WARM_START)
        patience: int = option(defaults.GA_PATIENCE, at_least=1)
        race_first_rows: int | None = option(None, at_least=1)      # None: one micro-batch (the fidelity's step)
        race_z: float | None = option(defaults.RACE_Z)
        restart: str = option(defaults.GA_RESTART, choices=("step", "dp"))

    def races(self, options) -> bool:
        opts = self.parse(options)
        return opts.racing or (opts.dp_rows is not None and self._probes(opts))   # DP probes on dp_rows rows

    @staticmethod
    def _probes(opts: Options) -> bool:
        """Whether the search probes layers at all: the warm start, or the DP re-linearised at a restart."""
        return opts.warm_start or opts.restart == "dp"

    def check(self, space, max_evals: int, options) -> None:
        """The base checks, and a note naming given options that another option turns off (they would change
        nothing, silently): the race's with ``racing=false``, the DP's with ``warm_start=false`` (``dp_probes``,
        ``dp_rows`` and ``dp_radius`` still act with ``restart=dp``)."""
        super().check(space, max_evals, options)
        opts, options = self.parse(options), options or {}
        idle = [f"{k} (racing=false)" for k in ("race_first_rows", "race_z") if k in options and not opts.racing]
        if not opts.warm_start:                  # a restart's probes use all but dp_rounds (the warm start's)
            dp = ("dp_rounds",) if self._probes(opts) else ("dp_probes", "dp_rows", "dp_rounds", "dp_radius")
            idle += [f"{k} (warm_start=false)" for k in dp if k in options]
        if idle:
            log.info(f"ga: --option {', '.join(idle)} changes nothing in this search")

    def check_budget(self, space, max_evals: int, options, fidelity) -> None:
        self._check_rows(self.parse(options), fidelity)

    @staticmethod
    def _check_rows(opts: Options, fidelity) -> None:
        check_rows(fidelity, "dp_rows", opts.dp_rows)
        check_rows(fidelity, "race_first_rows", opts.race_first_rows)

    def schedule(self, ctx: SearchContext, opts: Options) -> RaceSchedule | None:
        """The race of one generation, or None when racing is off or impossible (no fidelity, one micro-batch)."""
        return race_schedule(ctx.fidelity, opts.race_first_rows) if opts.racing else None

    def run(self, ctx: SearchContext) -> SearchResult:
        opts, space = self.parse(ctx.options), ctx.space
        self._check_rows(opts, ctx.fidelity)
        schedule = self.schedule(ctx, opts)
        offspring = opts.offspring or (defaults.GA_RACE_OFFSPRING if schedule else defaults.GA_OFFSPRING)
        step = dmax = opts.mutation_max_delta or default_step(space)
        widest = widest_step(space, dmax)
        cache = ctx.cache(probes=True)
        uniform = space.uniform()
        with cache.phase("uniform"):
            cache(uniform[None])
        centres = [uniform]
        with cache.phase("dp warm start"):
            warm = self._warm_start(ctx, opts, cache, uniform)
        if warm is not None and tuple(warm) != tuple(uniform):
            centres.append(warm)
        evaluate = (lambda X: race(cache, X, schedule, opts.race_z)) if schedule else cache
        problem = AllocationProblem(space, cache, evaluate=evaluate)
        restart = 0
        while not cache.exhausted:
            _, before = cache.best(space.budget)
            watch = _Stagnation(cache, space.budget, opts.patience)
            algorithm = GA(pop_size=opts.elites, n_offsprings=offspring,
                           sampling=NeighbourhoodSampling(np.array(centres), step),
                           crossover=TwoPointCrossover(prob=opts.crossover_prob),
                           mutation=LevelSwitchMutation(tmax=opts.mutation_max_moves, dmax=step),
                           repair=BudgetRepair(space.budget), eliminate_duplicates=True)
            spent = cache.spent
            with cache.phase("ga generations"):
                drive(algorithm, problem, ctx.seed + restart, stop=watch)
            if cache.spent == spent:                     # nothing new around this centre at any step: converged
                break
            best, after = cache.best(space.budget)
            step = next_step(step, dmax, widest, improved=after > before)
            centres, restart = [best], restart + 1
            if opts.restart == "dp" and after <= before:
                with cache.phase("dp restarts"):
                    relinearised = self._relinearise(ctx, opts, cache, best)    # the additive model around the best
                if relinearised is not None and tuple(relinearised) != tuple(best):
                    centres.append(relinearised)
        return result_from(cache, budget=space.budget)

    def _warm_start(self, ctx: SearchContext, opts: Options, cache: EvaluationCache, uniform: np.ndarray
                    ) -> np.ndarray | None:
        """The trust-region sensitivity DP plan around uniform, when enabled and its rounds fit
        ``GA_DP_BUDGET_SHARE`` of the budget (round 1 probes fewer counts per layer when it would spend more)."""
        if not opts.warm_start:
            return None
        budget = probe_budget(ctx, opts, share=defaults.GA_DP_BUDGET_SHARE)
        if budget.probes < MIN_PROBES:
            return None
        return sensitivity_search(cache, ctx.space, uniform, budget.probes, rows=budget.rows,
                                  allowance=defaults.GA_DP_BUDGET_SHARE * ctx.max_evals, **search_options(opts))

    def _relinearise(self, ctx: SearchContext, opts: Options, cache: EvaluationCache, best: np.ndarray
                     ) -> np.ndarray | None:
        """The DP plan with probes within ``dp_radius`` of ``best`` and, where it sits at their edge, further out
        (``restart=dp``; limited by ``--evals`` only); None when the budget cannot pay for two probes per layer."""
        budget = probe_budget(ctx, opts)
        if budget.probes < MIN_PROBES:
            return None
        return sensitivity_step(cache, ctx.space, best, probe_grid(ctx.space, best, budget.probes, opts.dp_radius),
                                budget.rows)


class _Stagnation:
    """``stop()`` for ``drive``: True once the best on the budget has not improved for ``patience`` generations."""

    def __init__(self, cache: EvaluationCache, budget: int, patience: int):
        self.cache, self.budget, self.patience = cache, budget, patience
        self.best, self.idle = cache.best(budget)[1], 0

    def __call__(self) -> bool:
        value = self.cache.best(self.budget)[1]
        if value > self.best:
            self.best, self.idle = value, 0
        else:
            self.idle += 1
        return self.idle >= self.patience
