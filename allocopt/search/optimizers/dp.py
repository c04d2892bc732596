"""``dp``: the sensitivity allocation (OWL / SPDY family), a baseline of its own and ``ga``'s warm start.

Probes every layer at a grid of kept counts with the other layers at the uniform plan, fits the additive model of
``allocopt.search.sensitivity`` and returns its exact DP optimum (or uniform, if that scores higher). With
``dp_rounds`` > 1 it re-linearises in a trust region: probes around the DP plan and solves again, while that
improves; a layer the DP puts at the edge of its probed range is probed further out. Options: ``dp_probes`` (at
most this many counts probed per layer in round 1: those within ``dp_radius`` of uniform, then the layer's bounds;
``defaults.DP_PROBES``), ``dp_rounds`` (``defaults.DP_ROUNDS``), ``dp_radius`` (``defaults.DP_RADIUS``),
``dp_rows`` (probe on the first rows only; default all rows). Probes count toward ``--evals`` like any evaluation.
"""
from __future__ import annotations

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.optimizers.base import SearchContext, SearchResult, check_at_least, option, result_from
from allocopt.search.sensitivity import sensitivity_search


def probes_per_layer(ctx: SearchContext, share: float = 1.0) -> int:
    """Counts probed per layer: ``dp_probes`` if given, else as many as ``share`` of the budget pays for one
    round besides the uniform plan and the DP plan (at most ``defaults.DP_PROBES``)."""
    given = option(ctx.options, "dp_probes", int, None)
    if given is not None:
        return given
    return int(min(defaults.DP_PROBES, (share * ctx.max_evals - 2) // ctx.space.size))


# The least each ``dp_*`` option may be (dp_probes: a count either side of the base); ``dp`` and ``ga`` check them.
DP_MINIMUMS = {"dp_probes": 2, "dp_rows": 1, "dp_rounds": 1, "dp_radius": 1}


def search_options(ctx: SearchContext) -> dict:
    """``sensitivity_search`` keywords from the ``dp_*`` options (defaults from ``allocopt.defaults``)."""
    return {"rows": option(ctx.options, "dp_rows", int, None),
            "rounds": option(ctx.options, "dp_rounds", int, defaults.DP_ROUNDS),
            "radius": option(ctx.options, "dp_radius", int, defaults.DP_RADIUS)}


class SensitivityAllocation:
    name = "dp"

    def check(self, space, max_evals: int, options: dict) -> None:
        check_at_least(options, DP_MINIMUMS)
        probes = option(options, "dp_probes", int, None)
        need = (probes or DP_MINIMUMS["dp_probes"]) * space.size + 2 if space is not None else 0
        if max_evals < need:
            per_layer = f"{probes} probes per layer (--option dp_probes)" if probes else "two probes per layer"
            raise AllocoptError(f"dp needs at least {need} evaluations (the uniform plan, {per_layer} and the DP "
                                f"plan), got --evals {max_evals}; raise --evals" + (" or lower dp_probes" if probes else ""))

    def run(self, ctx: SearchContext) -> SearchResult:
        self.check(ctx.space, ctx.max_evals, ctx.options)
        space, cache = ctx.space, ctx.cache(probes=True)
        base = space.uniform()
        cache(base[None])
        sensitivity_search(cache, space, base, probes_per_layer(ctx), **search_options(ctx))
        return result_from(cache, budget=space.budget)
