"""Sensitivity allocation: per-layer probes, an additive model across layers, the exact DP optimum under the budget.

The OWL / SPDY family of layer-wise allocations (OWL: Yin et al., arXiv 2310.05175; SPDY: Frantar & Alistarh,
arXiv 2201.13096; EvoPress ships the same knapsack as its `dp_search.py` baseline, related-work.md §1.5): measure
how much the objective drops when one layer alone moves to each of a grid of kept counts, assume the drops add up
across layers, and solve the resulting knapsack exactly by dynamic programming.

*Where* the probes are taken decides how well the additive model holds. Probing each layer with every other layer
at the base allocation (the uniform plan, or the current best when re-linearising) measures the interactions near
that plan; probing layers alone with the rest unpruned does not (issue #12: on the testbed at 50% sparsity the
first gives the best plan known, the second closes 44% of the gap). The model holds near its base and weakens for
larger moves (at 25% sparsity the first DP plan closes 80% of the gap), so :func:`sensitivity_search` re-linearises
coarse to fine: round 1 probes at Fibonacci offsets around uniform (fine near it, coarse far away), each later
round only the counts within ``radius`` of the last DP plan (a trust region: on the testbed 24 probes instead of
round 1's 48), while the DP plan keeps improving. Probes are plans off the budget (one layer moved): the study
records them, searches never return them.

    grid = probe_grid(space, base, probes=12)                        # per layer: counts probed
    values = evaluate(probe_plans(base, grid))                      # one value per probe
    plan = dp_plan(space, base, base_value, grid, values)           # exact optimum of the additive model
"""
from __future__ import annotations

import math

import numpy as np

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.space import AllocationSpace


def fibonacci_offsets(limit: int) -> list[int]:
    """1, 2, 3, 5, 8, 13, ... up to ``limit``: probe spacing that is fine next to the base and coarse far from it."""
    out, a, b = [], 1, 2
    while a <= limit:
        out.append(a)
        a, b = b, a + b
    return out


def probe_grid(space: AllocationSpace, base: np.ndarray, probes: int, radius: int | None = None
               ) -> list[np.ndarray]:
    """Per layer, at most ``probes`` counts to probe (the base count is never probed: its value is the base plan's).

    Without ``radius`` (round 1): the counts at Fibonacci offsets (+-1, 2, 3, 5, 8, ...) from the base count within
    the layer's bounds, nearest first. The additive model is accurate next to the base, where most moves are, and
    coarse far away, where later rounds refine it; on the testbed this keeps the every-count round-1 DP plans at
    reap 50% and frequency 25% with 8 probes per layer instead of 12 (28 instead of 43.5 full forwards, issue #12).
    With ``radius``: every count within ``radius`` of the base, nearest first. Shapes: ``base`` [L] -> L arrays.
    """
    if probes < 1:
        raise AllocoptError(f"a sensitivity grid needs at least 1 probe per layer (got {probes}); raise dp_probes")
    grid = []
    for lo, hi, b in zip(space.lower, space.upper, np.asarray(base)):
        offsets = range(1, radius + 1) if radius is not None else fibonacci_offsets(int(hi - lo))
        counts = [c for d in offsets for c in (b - d, b + d) if lo <= c <= hi][:probes]
        grid.append(np.array(sorted(counts), dtype=np.int64))
    return grid


def probe_plans(base: np.ndarray, grid: list[np.ndarray]) -> np.ndarray:
    """[P, L]: the base plan with one layer moved to each of its grid counts (layer order, then count order)."""
    base = np.asarray(base, dtype=np.int64)
    rows = []
    for layer, counts in enumerate(grid):
        for c in counts:
            x = base.copy()
            x[layer] = c
            rows.append(x)
    return np.array(rows, dtype=np.int64).reshape(-1, len(base))


def layer_costs(space: AllocationSpace, base: np.ndarray, base_value: float, grid: list[np.ndarray],
                values: np.ndarray) -> list[np.ndarray]:
    """Additive model: ``costs[l][c - lower[l]]`` = the loss of layer l at count c, relative to the base.

    Loss is ``-log value`` when every value is positive (ESAP: agreements multiply across layers), else ``-value``.
    Between probed counts the loss is interpolated linearly; a failed probe (NaN) is left out of the
    interpolation; counts outside the probed range (a radius-limited grid) cost +inf, so the DP stays where the
    model was measured. Values are signed, higher is better. Shapes: ``values`` [P] in :func:`probe_plans` order.
    """
    values = np.asarray(values, dtype=float)
    finite = np.concatenate([values[np.isfinite(values)], [base_value]])
    loss = (lambda v: -np.log(v)) if np.all(finite > 0) else (lambda v: -v)
    costs, at = [], 0
    for layer, counts in enumerate(grid):
        v = values[at: at + len(counts)]
        at += len(counts)
        ok = np.isfinite(v)
        xs = np.concatenate([counts[ok], [base[layer]]])
        ys = np.concatenate([loss(v[ok]), [loss(base_value)]]) - loss(base_value)
        order = np.argsort(xs)
        span = np.arange(space.lower[layer], space.upper[layer] + 1)
        cost = np.interp(span, xs[order], ys[order])
        cost[(span < xs.min()) | (span > xs.max())] = math.inf
        costs.append(cost)
    return costs


def dp_allocate(costs: list[np.ndarray], lower: np.ndarray, upper: np.ndarray, budget: int) -> np.ndarray:
    """Exact minimum of ``sum_l costs[l][x_l - lower_l]`` subject to ``sum_l x_l == budget`` and the bounds.

    Dynamic programming over layers and partial sums (a multiple-choice knapsack), O(L * budget * counts) with
    numpy over the budget axis. Ties go to the smaller count in earlier layers. Raises AllocoptError when the budget
    is infeasible.
    """
    lower, upper = np.asarray(lower, dtype=np.int64), np.asarray(upper, dtype=np.int64)
    if not int(lower.sum()) <= budget <= int(upper.sum()):
        raise AllocoptError(f"budget {budget} is outside {int(lower.sum())}..{int(upper.sum())}; fix the sparsity")
    best = np.full(budget + 1, math.inf)
    best[0] = 0.0
    choice = []
    for layer, cost in enumerate(costs):
        new = np.full(budget + 1, math.inf)
        pick = np.zeros(budget + 1, dtype=np.int64)
        for c in range(int(lower[layer]), int(upper[layer]) + 1):
            if c > budget:
                break
            cand = np.full(budget + 1, math.inf)
            cand[c:] = best[: budget + 1 - c] + cost[c - lower[layer]]
            better = cand < new
            new[better], pick[better] = cand[better], c
        best = new
        choice.append(pick)
    x, s = np.zeros(len(costs), dtype=np.int64), budget
    for layer in range(len(costs) - 1, -1, -1):
        x[layer] = choice[layer][s]
        s -= x[layer]
    return x


def dp_plan(space: AllocationSpace, base: np.ndarray, base_value: float, grid: list[np.ndarray],
            values: np.ndarray) -> np.ndarray:
    """The additive model's exact optimum on the space's budget (a feasible plan of ``space``)."""
    return dp_allocate(layer_costs(space, base, base_value, grid, values), space.lower, space.upper, space.budget)


def sensitivity_step(cache, space: AllocationSpace, base: np.ndarray, probes: int, rows: int | None = None,
                     radius: int | None = None, allowance: float | None = None) -> np.ndarray | None:
    """One linearisation: probe around ``base`` (counts within ``radius`` of it when given; on the first ``rows``
    rows when given and the cache races, else at full fidelity), solve the DP and evaluate its plan at full
    fidelity. Returns the plan, or None when the budget (or ``allowance``, in evaluation equivalents) cannot pay
    for the probes and the plan. ``cache`` is an ``EvaluationCache`` over ``space`` (values signed)."""
    grid = probe_grid(space, base, probes, radius)
    plans = probe_plans(base, grid)
    partial = rows is not None and cache.fidelity is not None and rows < cache.rows
    cost = len(plans) * (cache.fidelity.step * -(-rows // cache.fidelity.step) / cache.rows if partial else 1.0) + 1
    if cost > min(cache.remaining, math.inf if allowance is None else allowance):
        return None
    if partial:
        scores = cache.score(np.vstack([base[None], plans]), rows)
        if any(s is None for s in scores):               # the budget ran out part-way
            cache.prune(plans)
            return None
        base_value, values = scores[0].value, np.array([s.value for s in scores[1:]])
        cache.prune(plans)
    else:
        base_value = float(cache(base[None])[0])
        values = cache(plans)
    if not np.isfinite(base_value):
        return None
    plan = dp_plan(space, base, base_value, grid, values)
    cache(plan[None])
    return plan


def sensitivity_search(cache, space: AllocationSpace, base: np.ndarray, probes: int, rounds: int,
                       rows: int | None = None, radius: int = defaults.DP_RADIUS, allowance: float | None = None
                       ) -> np.ndarray | None:
    """Coarse-to-fine sensitivity allocation: round 1 probes at most ``probes`` counts per layer at Fibonacci offsets
    from ``base`` (:func:`probe_grid`); each of at most ``rounds - 1`` more probes only the counts within ``radius``
    of the last DP plan and solves again, while the DP plan is the best plan evaluated (a round that does not
    improve ends it).

    Issue #12, frequency at 25% on the testbed: round 1 (48 probes) gives [15, 11, 10, 11, 12, 13], 80% of the
    uniform -> best-known gap; round 2 around it gives the best-known plan. Returns the last improving DP plan, or
    None when none beat ``base``; all rounds together spend at most ``allowance`` evaluation equivalents.
    """
    plan, stop = None, None if allowance is None else cache.spent + allowance
    for r in range(rounds):
        left = None if stop is None else stop - cache.spent
        step = sensitivity_step(cache, space, base, probes, rows, radius=None if r == 0 else radius, allowance=left)
        if step is None or tuple(step) == tuple(base) or not np.array_equal(cache.best(space.budget)[0], step):
            break
        base = plan = step
    return plan
