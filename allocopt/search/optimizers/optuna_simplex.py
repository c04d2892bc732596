"""Optuna samplers (CMA-ES, TPE) over the simplex reparametrisation (optimizers.md §3.1).

Each trial suggests L floats u_l in [0, 1]; the plan is largest-remainder rounding of u_l * E_l into the
bounds with the exact budget, so every trial is feasible. u = 0.5 everywhere is the uniform plan: it is
evaluated first, it is CMA-ES's default mean, and it is enqueued for TPE so TPE's model learns from it. The
sampler runs on a private in-memory study with batched ask/tell; every distinct plan goes through ``ctx.evaluate``
(the StudyRecorder records and resumes it), and repeated plans are told their cached value without spending budget.
Options: ``popsize`` (cmaes, plans per batch and CMA-ES's population; ``defaults.CMAES_POPSIZE``) and ``batch``
(tpe, plans per batch; ``defaults.TPE_BATCH``).
"""
from __future__ import annotations

import warnings
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import optuna

from allocopt import defaults
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.optimizers.options import option
from allocopt.search.problem import MAX_STALLS
from allocopt.search.rounding import largest_remainder
from allocopt.search.space import AllocationSpace


def simplex_plan(space: AllocationSpace, u: np.ndarray) -> np.ndarray:
    return largest_remainder(np.asarray(u) * space.num_experts, space.budget, space.lower, space.upper)


class _OptunaSearch(Optimizer):
    enqueue_uniform = False

    @abstractmethod
    def sampler(self, ctx: SearchContext, opts) -> optuna.samplers.BaseSampler: ...

    @abstractmethod
    def batch_size(self, ctx: SearchContext, opts) -> int: ...

    def run(self, ctx: SearchContext) -> SearchResult:
        opts = self.parse(ctx.options)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space, cache = ctx.space, ctx.cache()
        cache(space.uniform()[None])             # the baseline first: result >= uniform whatever the sampler does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction="maximize", sampler=self.sampler(ctx, opts))
            if self.enqueue_uniform:
                study.enqueue_trial({f"u{i}": 0.5 for i in range(space.size)})
            k, stalls = self.batch_size(ctx, opts), 0
            while not cache.exhausted and stalls < MAX_STALLS:
                before = cache.evaluations
                trials = [study.ask() for _ in range(k)]
                X = np.array([simplex_plan(space, [t.suggest_float(f"u{i}", 0.0, 1.0) for i in range(space.size)])
                              for t in trials])
                for trial, value in zip(trials, cache(X)):
                    study.tell(trial, float(value) if np.isfinite(value) else None,
                               state=None if np.isfinite(value) else optuna.trial.TrialState.FAIL)
                stalls = stalls + 1 if cache.evaluations == before else 0
        return result_from(cache)


class CmaEsSearch(_OptunaSearch):
    name = "cmaes"

    @dataclass(frozen=True)
    class Options:
        popsize: int | None = option(defaults.CMAES_POPSIZE, at_least=2)   # None: 4 + floor(3 ln L), CMA-ES's own

    def sampler(self, ctx, opts):
        return optuna.samplers.CmaEsSampler(seed=ctx.seed, popsize=self.batch_size(ctx, opts))

    def batch_size(self, ctx, opts):
        return opts.popsize if opts.popsize is not None else 4 + int(3 * np.log(ctx.space.size))


class TPESearch(_OptunaSearch):
    name = "tpe"
    enqueue_uniform = True

    @dataclass(frozen=True)
    class Options:
        batch: int = option(defaults.TPE_BATCH, at_least=1)

    def sampler(self, ctx, opts):
        return optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True)

    def batch_size(self, ctx, opts):
        return opts.batch
