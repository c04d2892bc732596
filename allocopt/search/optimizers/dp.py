"""``dp``: the sensitivity allocation (OWL / SPDY family), a baseline of its own and ``ga``'s warm start.

Probes every layer at a grid of kept counts with the other layers at the uniform plan, fits the additive model of
``allocopt.search.sensitivity`` and returns its exact DP optimum. With ``dp_rounds`` > 1 it re-linearises: probes
again around the best plan so far and solves again, while that improves. Options: ``dp_probes`` (counts probed per
layer, default every count up to ``defaults.DP_PROBES``), ``dp_rounds`` (``defaults.DP_ROUNDS``), ``dp_rows``
(probe on the first rows only; default all rows). Probes count toward ``--evals`` like any evaluation.
"""
from __future__ import annotations

import numpy as np

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.optimizers.base import SearchContext, SearchResult, result_from
from allocopt.search.sensitivity import sensitivity_step


def probes_per_layer(ctx: SearchContext, share: float = 1.0) -> int:
    """Counts probed per layer: ``dp_probes`` if given, else as many as ``share`` of the budget pays for one
    round (at most ``defaults.DP_PROBES``)."""
    given = ctx.options.get("dp_probes")
    if given is not None:
        return int(given)
    return int(min(defaults.DP_PROBES, (share * ctx.max_evals - 1) // ctx.space.size))


class SensitivityAllocation:
    name = "dp"

    def run(self, ctx: SearchContext) -> SearchResult:
        space, cache = ctx.space, ctx.cache(probes=True)
        probes = probes_per_layer(ctx)
        if probes < 1:
            raise AllocoptError(f"dp needs at least {space.size + 1} evaluations (one probe per layer and the uniform "
                                f"plan), got --evals {ctx.max_evals}; raise --evals")
        rows = ctx.options.get("dp_rows")
        base = space.uniform()
        cache(base[None])
        for _ in range(int(ctx.options.get("dp_rounds", defaults.DP_ROUNDS))):
            plan = sensitivity_step(cache, space, base, probes, None if rows is None else int(rows))
            if plan is None or tuple(plan) == tuple(base):
                break
            best, value = cache.best(space.budget)
            if not np.array_equal(best, plan):          # the model's optimum did not improve on the base
                break
            base = plan
        return result_from(cache, budget=space.budget)
