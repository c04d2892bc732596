"""Sensitivity allocation: per-layer probes, an additive model across layers, the exact DP optimum under the budget.

The OWL / SPDY family of layer-wise allocations (OWL: Yin et al., arXiv 2310.05175; SPDY: Frantar & Alistarh,
arXiv 2201.13096; EvoPress ships the same knapsack as its `dp_search.py` baseline, related-work.md §1.5): measure
how much the objective drops when one layer alone moves to each of a grid of kept counts, assume the drops add up
across layers, and solve the resulting knapsack exactly by dynamic programming.

*Where* the probes are taken decides how well the additive model holds. Probing each layer with every other layer
at the base allocation (the uniform plan, or the current best when re-linearising) measures the interactions near
that plan; probing layers alone with the rest unpruned does not (issue #12: on the testbed at 50% sparsity the
first gives the best plan known, the second closes 44% of the gap). The model holds near its base and weakens for
larger moves (at 25% sparsity the first DP plan closes 80% of the gap), so :func:`sensitivity_search` works like a
trust-region method:

- round 1 probes the counts within ``radius`` of uniform and each layer's two bounds (the DP interpolates between
  them, so it can see a layer whose value lies far away: EAN at 50% moves layer 0 from 8 to 15 experts);
- each later round probes around the previous round's best DP plan, ``radius`` further in the direction each layer
  last moved and one count back (:func:`probe_grid`), while that plan keeps improving;
- in every round, where the DP plan sits at the edge of a layer's probed range (the DP never leaves it), the layer
  is probed one Fibonacci step further out and the DP solved again (:func:`extend_grid`); each DP plan is
  evaluated as soon as it is solved, so a search holds its best plan as early as possible.

Probes are plans off the budget (one layer moved): the study records them, searches never return them.

    grid = probe_grid(space, base, probes=6, radius=2, bounds=True)  # per layer: counts probed
    values = evaluate(probe_plans(base, grid))                      # one value per probe
    plan = dp_plan(space, base, base_value, grid, values)           # exact optimum of the additive model
"""
from __future__ import annotations

import math

import numpy as np

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.rounding import dp_allocate
from allocopt.search.space import AllocationSpace


def next_fibonacci(offset: int) -> int:
    """The first of 1, 2, 3, 5, 8, 13, ... above ``offset``: extension steps that are fine next to the base and
    coarse far from it."""
    a, b = 1, 2
    while a <= offset:
        a, b = b, a + b
    return a


def probe_grid(space: AllocationSpace, base: np.ndarray, probes: int, radius: int,
               previous: np.ndarray | None = None, bounds: bool = False) -> list[np.ndarray]:
    """Per layer, at most ``probes`` counts to probe (the base count is never probed: its value is the base plan's).

    In order, whole steps only: the counts 1 from the base, with ``bounds`` the layer's lowest and highest count,
    then the counts 2, 3, ... ``radius`` from the base. With ``previous`` (the plan the last round started from)
    the counts beyond 1 only in the direction a layer last moved, and none beyond 1 for a layer that did not move
    (an asymmetric trust region: a layer the last DP moved down is probed further down, and one count back up).
    Raises AllocoptError below 2 probes (a count either side). Shapes: ``base``, ``previous`` [L] -> L arrays.
    """
    if probes < 2:
        raise AllocoptError(f"a sensitivity grid needs at least 2 probes per layer, one either side (got {probes}); "
                            "raise dp_probes or --evals")
    moved = np.zeros(len(base), dtype=np.int64) if previous is None else np.sign(np.asarray(base) - previous)
    grid = []
    for layer, (b, m) in enumerate(zip(np.asarray(base), moved)):
        ladder = space.levels(layer)             # steps are along the counts a layer may keep (all, or the allowed)
        b = _rung(ladder, b)
        lo, hi = 0, len(ladder) - 1
        steps = [[b - 1, b + 1], *([[lo, hi]] if bounds else [])]
        steps += [[b + s * d for s in (-1, 1) if previous is None or s == m] for d in range(2, radius + 1)]
        rungs: list[int] = []
        for step in steps:
            new = [int(c) for c in step if lo <= c <= hi and c != b and c not in rungs]
            if len(rungs) + len(new) > probes:
                break
            rungs += new
        grid.append(ladder[sorted(rungs)].astype(np.int64))
    return grid


def _rung(ladder: np.ndarray, count: int) -> int:
    """Position on ``ladder`` (a layer's allowed counts, ascending) of the allowed count nearest ``count``."""
    return int(np.argmin(np.abs(ladder - int(count))))


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
        cost[(span < xs.min()) | (span > xs.max()) | ~np.isin(span, space.levels(layer))] = math.inf
        costs.append(cost)
    return costs


def dp_plan(space: AllocationSpace, base: np.ndarray, base_value: float, grid: list[np.ndarray],
            values: np.ndarray) -> np.ndarray:
    """The additive model's exact optimum on the space's budget (a feasible plan of ``space``)."""
    return dp_allocate(layer_costs(space, base, base_value, grid, values), space.lower, space.upper, space.budget)


def extend_grid(space: AllocationSpace, base: np.ndarray, grid: list[np.ndarray], plan: np.ndarray) -> list[np.ndarray]:
    """Counts to probe next where the DP plan moved a layer to the edge of its probed range: the next Fibonacci
    offset (1, 2, 3, 5, 8, ...) from the base beyond that edge, clipped to the layer's bound. The DP never leaves the
    probed range, so a plan at an edge is the one sign that the layer may want to move further; elsewhere the grid
    is enough. Shapes: ``base``, ``plan`` [L]; ``grid`` L arrays -> L arrays (empty where nothing is added)."""
    out = []
    for layer, (b, counts, x) in enumerate(zip(np.asarray(base), grid, np.asarray(plan))):
        ladder = space.levels(layer)                       # offsets count rungs of the layer's allowed counts
        b, x = _rung(ladder, b), _rung(ladder, x)
        probed = np.append([_rung(ladder, c) for c in counts], b)
        lo, hi = 0, len(ladder) - 1
        new = []
        for edge, bound, sign in ((probed.max(), hi, 1), (probed.min(), lo, -1)):
            if x == edge and x != b and sign * (bound - edge) > 0:
                new.append(int(np.clip(b + sign * next_fibonacci(int(abs(edge - b))), lo, hi)))
        out.append(ladder[sorted(new)].astype(np.int64))
    return out


def _probe_values(cache, base: np.ndarray, plans: np.ndarray, rows: int | None, partial: bool
                  ) -> tuple[float, np.ndarray] | None:
    """(base value, probe values [P]) at full fidelity, or on the first ``rows`` rows (raced probes become
    PRUNED trials); None when the budget ran out part-way."""
    if not partial:
        return float(cache(base[None])[0]), cache(plans)
    scores = cache.score(np.vstack([base[None], plans]), rows)
    cache.prune(plans)
    if any(s is None for s in scores):
        return None
    return scores[0].value, np.array([s.value for s in scores[1:]])


def probe_cost(fidelity, rows: int | None) -> float:
    """What one probe on the first ``rows`` search rows costs in full-evaluation equivalents: whole micro-batches of
    ``fidelity.step`` rows out of ``fidelity.rows``; 1 on all rows or without partial scoring (``fidelity`` None)."""
    if rows is None or fidelity is None or rows >= fidelity.rows:
        return 1.0
    return min(1.0, fidelity.step * math.ceil(rows / fidelity.step) / fidelity.rows)


def sensitivity_step(cache, space: AllocationSpace, base: np.ndarray, grid: list[np.ndarray], rows: int | None = None,
                     allowance: float | None = None) -> np.ndarray | None:
    """One linearisation around ``base``: probe ``grid`` (on the first ``rows`` rows when given and the cache races,
    else at full fidelity), solve the DP and evaluate its plan, then probe further out where the plan sits at the
    edge of the probed range (:func:`extend_grid`) and solve and evaluate again, until it does not. Returns the best
    DP plan evaluated, or None when the budget (or ``allowance``, in evaluation equivalents) cannot pay for the
    first probes and the plan, the base plan failed, or partial scores ran out of budget. ``cache`` is an
    ``EvaluationCache`` over ``space`` (values signed)."""
    partial = rows is not None and cache.fidelity is not None and rows < cache.rows
    per_probe = probe_cost(cache.fidelity, rows)
    stop = cache.spent + (math.inf if allowance is None else allowance)

    def affordable(n: int) -> bool:
        return n * per_probe + 1 <= min(cache.remaining, stop - cache.spent) + 1e-9

    plans = probe_plans(base, grid)
    if not affordable(len(plans)):
        return None
    probed = _probe_values(cache, base, plans, rows, partial)
    if probed is None or not np.isfinite(probed[0]):
        return None
    base_value, values = probed
    value_of = dict(zip(_probe_keys(grid), values))
    solved: list[tuple[float, np.ndarray]] = []

    def best_solved() -> np.ndarray:
        return max(solved, key=lambda item: item[0] if np.isfinite(item[0]) else -math.inf)[1]

    while True:
        plan = dp_plan(space, base, base_value, grid, values)
        solved.append((float(cache(plan[None])[0]), plan))
        more = extend_grid(space, base, grid, plan)
        extra = probe_plans(base, more)
        if not len(extra) or not affordable(len(extra)):
            return best_solved()
        probed = _probe_values(cache, base, extra, rows, partial)
        if probed is None:
            return best_solved()
        value_of.update(zip(_probe_keys(more), probed[1]))
        grid = [np.union1d(g, m).astype(np.int64) for g, m in zip(grid, more)]
        values = np.array([value_of[key] for key in _probe_keys(grid)])


def _probe_keys(grid: list[np.ndarray]) -> list[tuple[int, int]]:
    """(layer, count) of each row of ``probe_plans(base, grid)``."""
    return [(layer, int(c)) for layer, counts in enumerate(grid) for c in counts]


def sensitivity_search(cache, space: AllocationSpace, base: np.ndarray, probes: int, rounds: int,
                       rows: int | None = None, radius: int = defaults.DP_RADIUS, allowance: float | None = None
                       ) -> np.ndarray | None:
    """Trust-region sensitivity allocation (module docstring): round 1 probes at most ``probes`` counts per layer
    (:func:`probe_grid` with the bounds); each of at most ``rounds - 1`` more probes around the previous round's
    plan (asymmetric ``radius``), while a round's plan is the best plan evaluated (a round that does not improve
    ends it).

    Issue #12, frequency at 25% on the testbed: round 1 (36 probes) gives [16, 11, 10, 10, 12, 13]; round 2 (15
    probes) gives the best-known plan [15, 12, 8, 10, 12, 15] as the 54th evaluation (its 4 extensions confirm it).
    Returns the last improving DP plan, or None when none beat ``base``; all rounds together spend at most
    ``allowance`` evaluation equivalents.
    """
    plan, previous, stop = None, None, None if allowance is None else cache.spent + allowance
    for r in range(rounds):
        left = None if stop is None else stop - cache.spent
        grid = probe_grid(space, base, probes, radius, previous, bounds=r == 0)
        step = sensitivity_step(cache, space, base, grid, rows, allowance=left)
        if step is None or tuple(step) == tuple(base) or not np.array_equal(cache.best(space.budget)[0], step):
            break
        previous, base, plan = base, step, step
    return plan
