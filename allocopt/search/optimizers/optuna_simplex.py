"""Optuna samplers (CMA-ES, TPE) over the simplex reparametrisation (optimizers.md §3.1).

Each trial suggests L floats u_l in [0, 1]; the plan is largest-remainder rounding of u_l * E_l into the
bounds with the exact budget, so every trial is feasible. u = 0.5 everywhere is the uniform plan: it is
evaluated first, it is CMA-ES's default mean, and it is enqueued for TPE so TPE's model learns from it. The sampler runs on a private in-memory study with batched
ask/tell; every distinct plan goes through ``ctx.evaluate`` (the StudyRecorder records and resumes it), and
repeated plans are told their cached value without spending budget.
"""
from __future__ import annotations

import warnings

import numpy as np
import optuna

from allocopt.search.optimizers.base import SearchContext, SearchResult, result_from
from allocopt.search.problem import MAX_STALLS
from allocopt.search.rounding import largest_remainder
from allocopt.search.space import AllocationSpace


def simplex_plan(space: AllocationSpace, u: np.ndarray) -> np.ndarray:
    return largest_remainder(np.asarray(u) * space.num_experts, space.budget, space.lower, space.upper)


class _OptunaSearch:
    name = ""
    enqueue_uniform = False

    def sampler(self, ctx: SearchContext) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def batch_size(self, ctx: SearchContext) -> int:
        return max(1, ctx.population)

    def run(self, ctx: SearchContext) -> SearchResult:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space, cache = ctx.space, ctx.cache()
        cache(space.uniform()[None])             # the baseline first: result >= uniform whatever the sampler does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction="maximize", sampler=self.sampler(ctx))
            if self.enqueue_uniform:
                study.enqueue_trial({f"u{i}": 0.5 for i in range(space.size)})
            k, stalls = self.batch_size(ctx), 0
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

    def sampler(self, ctx):
        return optuna.samplers.CmaEsSampler(seed=ctx.seed, popsize=self.batch_size(ctx))

    def batch_size(self, ctx):
        return int(ctx.options.get("popsize", 4 + int(3 * np.log(ctx.space.size))))


class TPESearch(_OptunaSearch):
    name = "tpe"
    enqueue_uniform = True

    def sampler(self, ctx):
        return optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True)

    def batch_size(self, ctx):
        return int(ctx.options.get("batch", 8))
