"""``dp``: the sensitivity allocation (OWL / SPDY family), a baseline of its own and ``ga``'s warm start.

Probes every layer at a grid of kept counts with the other layers at the uniform plan, fits the additive model of
``allocopt.search.sensitivity`` and returns its exact DP optimum (or uniform, if that scores higher). With
``dp_rounds`` > 1 it re-linearises in a trust region: probes around the DP plan and solves again, while that
improves; a layer the DP puts at the edge of its probed range is probed further out. Options: ``dp_probes`` (at
most this many counts probed per layer in round 1: those within ``dp_radius`` of uniform, then the layer's bounds;
default: as many as the budget pays for, at most ``defaults.DP_PROBES``), ``dp_rounds`` (``defaults.DP_ROUNDS``),
``dp_radius`` (``defaults.DP_RADIUS``), ``dp_rows`` (score probes on the first rows only; default all rows). Probes
count toward ``--evals`` like any evaluation, a probe on partial rows as its fraction of one (:func:`probe_budget`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.fidelity import check_rows
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.optimizers.options import option
from allocopt.search.sensitivity import probe_cost, sensitivity_search

MIN_PROBES = 2                   # a count either side of the base


@dataclass(frozen=True)
class ProbeBudget:
    """Round 1 of a sensitivity search: counts probed per layer and the search rows each probe is scored on."""

    probes: int                  # counts per layer (below MIN_PROBES: no grid can be probed)
    rows: int | None             # first rows of the search set; None: all (full fidelity)


def probe_budget(ctx: SearchContext, opts: SensitivityAllocation.Options, share: float = 1.0) -> ProbeBudget:
    """The probes per layer that ``share`` of ``--evals`` pays for besides the uniform and DP plans, each scored on
    ``dp_rows`` rows (all rows by default; a probe on r of R rows costs r/R of an evaluation, rounded up to whole
    micro-batches), at most ``defaults.DP_PROBES``; ``dp_probes`` when given.

    All rows stay the default although fewer would pay for more probes on a deep model: at the budget per layer of
    a 48-layer model, probes on a quarter of the rows did not beat the GA alone on either testbed
    (``studies/reports/warm_start_cost.md``), so below two full-row probes per layer the warm start is skipped.
    """
    cost = probe_cost(ctx.fidelity, opts.dp_rows)
    fitting = int(min(defaults.DP_PROBES, (share * ctx.max_evals - 2) // (ctx.space.size * cost)))
    return ProbeBudget(opts.dp_probes or fitting, opts.dp_rows)


def search_options(opts: SensitivityAllocation.Options) -> dict:
    """``sensitivity_search`` keywords from the ``dp_*`` options besides the probes and rows."""
    return {"rounds": opts.dp_rounds, "radius": opts.dp_radius}


class SensitivityAllocation(Optimizer):
    name = "dp"

    @dataclass(frozen=True)
    class Options:               # also ``ga``'s, for its warm start
        dp_probes: int | None = option(None, at_least=MIN_PROBES)      # None: what the budget pays, <= DP_PROBES
        dp_rows: int | None = option(None, at_least=1)                 # None: all search rows
        dp_rounds: int = option(defaults.DP_ROUNDS, at_least=1)
        dp_radius: int = option(defaults.DP_RADIUS, at_least=1)

    def races(self, options) -> bool:
        return self.parse(options).dp_rows is not None      # probes on partial rows need the runner's fidelity

    def check(self, space, max_evals: int, options) -> None:
        opts = self.parse(options)
        if opts.dp_rows is None:            # a probe on partial rows is priced by the search set, known only at run
            self._check_budget(space, max_evals, opts, per_probe=1.0)

    def check_budget(self, space, max_evals: int, options, fidelity) -> None:
        self._check_search(space, max_evals, self.parse(options), fidelity)

    def _check_search(self, space, max_evals: int, opts: Options, fidelity) -> None:
        """``check_budget`` on parsed options (``run`` checks with those it parsed)."""
        check_rows(fidelity, "dp_rows", opts.dp_rows)
        self._check_budget(space, max_evals, opts, per_probe=probe_cost(fidelity, opts.dp_rows),
                           partial=fidelity is not None)

    def _check_budget(self, space, max_evals: int, opts: Options, per_probe: float, partial: bool = True) -> None:
        """Refuse a budget below the uniform plan, the DP plan and the fewest probes (``per_probe`` evaluations
        each: 1 on all rows, a fraction on ``dp_rows``)."""
        probes = opts.dp_probes
        need = math.ceil((probes or MIN_PROBES) * space.size * per_probe + 2 - 1e-9) if space is not None else 0
        if max_evals < need:
            per_layer = f"{probes} probes per layer (--option dp_probes)" if probes else "two probes per layer"
            rows = f" on {opts.dp_rows} rows" if opts.dp_rows is not None and per_probe < 1 else ""
            whole = (" (dp_rows needs partial scoring, which a search over --workers > 1 or a server storage does "
                     "not have: it scores every plan on all rows)" if opts.dp_rows is not None and not partial else "")
            raise AllocoptError(f"dp needs at least {need} evaluations (the uniform plan, {per_layer}{rows} and the DP "
                                f"plan), got --evals {max_evals}{whole}; raise --evals" + (" or lower dp_probes" if probes else ""))

    def run(self, ctx: SearchContext) -> SearchResult:
        opts = self.parse(ctx.options)
        self._check_search(ctx.space, ctx.max_evals, opts, ctx.fidelity)
        space, cache = ctx.space, ctx.cache(probes=True)
        base = space.uniform()
        cache(base[None])
        budget = probe_budget(ctx, opts)
        sensitivity_search(cache, space, base, budget.probes, rows=budget.rows, **search_options(opts))
        return result_from(cache, budget=space.budget)
