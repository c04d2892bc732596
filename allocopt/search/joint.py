"""Experts and bit-widths together under one byte budget (issue #23): the joint space and its search.

A joint plan is ``x = [counts (L), levels (L)]``: layer l keeps ``counts[l]`` experts whose weight matrices are
stored at ``bits[levels[l]]`` (``bits`` ordered from the most bytes to the fewest; None is the checkpoint's
precision). What it weighs is the export's size model (``export.size.ExportSize``)::

    bytes(x) = fixed + sum_l counts[l] * expert_bytes[l, levels[l]]

and a plan is feasible when every count is one its layer may keep (bounds, routing groups, ``--allowed-counts``:
the count space's ``levels``) and ``bytes(x) <= budget``. :meth:`JointSpace.repair` sends any vector to a feasible
plan that no further expert (nor, where no expert fits, a wider bit-width) fits: the bytes it leaves are fewer than
any one step of growth costs.

The search (:func:`joint_search`) is the default ``ga``'s recipe in two dimensions:
1. the *uniform-both* plans (one count and one bit-width for every layer, the most experts that fit at each
   bit-width) are evaluated; the best is the base;
2. the sensitivity DP as a multiple-choice knapsack: each layer is probed at counts around the base (at its
   bit-width) and at every other bit-width (at its count); the layer's loss is modelled as the sum of its count
   loss (interpolated, ``sensitivity.layer_costs``) and its bit-width loss, and the knapsack over byte costs
   (:func:`knapsack`) gives the best plan of that model; re-linearised around its plan while that improves;
3. a GA around the base and the DP plan: per-layer uniform crossover of (count, bit-width) pairs, level-switch
   moves of counts and one-level moves of bit-widths, byte repair, elitist survival; each generation's offspring
   are raced as ``ga``'s are (``search.racing``, when the run provides a fidelity), the engine keying partial rows
   by (kept experts, bit-widths); after ``patience`` generations without a better plan the move step doubles (as
   ``ga``'s restarts do), so the search spends its budget instead of stopping on a converged population.
All plans go through one evaluation cache. Its options (:class:`JointOptions`) are ``ga``'s that apply here, by the
same names. :func:`joint_front` is NSGA-II over the same plans with the export's bytes as the second objective.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.plan import Plan
from allocopt.search.fidelity import Fidelity
from allocopt.search.mutation import default_step, level_switch, next_step, widest_step
from allocopt.search.optimizers.options import NoOptions, option, parse_options
from allocopt.search.problem import EvaluationCache
from allocopt.search.racing import race, race_schedule
from allocopt.search.sensitivity import layer_costs, probe_grid
from allocopt.search.space import AllocationSpace, param_name


@dataclass(frozen=True)
class JointOptions:
    """``--option`` keys of ``ga --bits`` (:func:`joint_search`): ``ga``'s options that apply to it, with ga's
    defaults. ``nsga2 --bits`` (:func:`joint_front`) takes none."""

    racing: bool = option(defaults.GA_RACING)
    offspring: int | None = option(None, at_least=2)            # None: GA_RACE_OFFSPRING racing, else GA_OFFSPRING
    elites: int = option(defaults.GA_ELITES, at_least=2)
    patience: int = option(defaults.GA_PATIENCE, at_least=1)
    warm_start: bool = option(defaults.GA_WARM_START)
    dp_probes: int | None = option(None, at_least=2)            # None: what GA_DP_BUDGET_SHARE pays, <= DP_PROBES
    dp_rounds: int = option(defaults.DP_ROUNDS, at_least=1)
    dp_radius: int = option(defaults.DP_RADIUS, at_least=1)
    race_first_rows: int | None = option(None, at_least=1)      # None: one micro-batch (the fidelity's step)
    race_z: float | None = option(defaults.RACE_Z)


def joint_options(optimizer: str, raw) -> JointOptions | NoOptions:
    """``raw`` (``--option`` values) as the typed options of ``optimizer`` with ``--bits``; one AllocoptError line for
    a key it does not take (``ga``'s other options have no meaning in two dimensions)."""
    return parse_options(JointOptions if optimizer == "ga" else NoOptions, raw, f"{optimizer} --bits")


@dataclass(frozen=True)
class JointSpace:
    """Feasible joint plans (module docstring). ``counts`` supplies the layers, count bounds and allowed counts (its
    own budget is not used); ``expert_bytes[l, j]`` is what one kept expert of layer l adds at ``bits[j]``."""

    counts: AllocationSpace
    bits: tuple[int | None, ...]
    expert_bytes: np.ndarray          # [L, B] int64, each row decreasing
    fixed: int                        # bytes no plan changes (embeddings, attention, shared experts, routers' base)
    budget: int                       # bytes

    def __post_init__(self) -> None:
        if self.min_bytes() > self.budget:
            raise AllocoptError(f"the smallest plan (fewest experts at {self.bits[-1] or 'full'} bits) weighs "
                                f"{self.min_bytes()} bytes, over the budget of {self.budget}; raise --memory or allow "
                                "fewer bits")

    @property
    def layers(self) -> tuple[int, ...]:
        return self.counts.layers

    def levels(self, i: int) -> np.ndarray:
        """The counts layer ``i`` may keep, ascending (the count space's)."""
        return self.counts.levels(i)

    @property
    def size(self) -> int:
        return 2 * self.counts.size

    def split(self, x) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.int64)
        n = self.counts.size
        return x[..., :n], x[..., n:]

    def bytes(self, x) -> np.ndarray:
        """Export bytes of joint plans ([2L] -> scalar array, [n, 2L] -> [n])."""
        counts, levels = self.split(x)
        per = np.take_along_axis(self.expert_bytes[None], np.atleast_2d(levels)[..., None], axis=2)[..., 0]
        out = self.fixed + (np.atleast_2d(counts) * per).sum(-1)
        return out if np.ndim(x) == 2 else out[0]

    def min_bytes(self) -> int:
        return int(self.fixed + sum(self.levels(i)[0] * self.expert_bytes[i, -1] for i in range(self.counts.size)))

    def contains(self, x) -> bool:
        counts, levels = self.split(x)
        if np.shape(x) != (self.size,) or np.any(levels < 0) or np.any(levels >= len(self.bits)):
            return False
        if not all(c in self.levels(i) for i, c in enumerate(counts)):
            return False
        return int(self.bytes(x)) <= self.budget

    def filled(self, x) -> bool:
        """Whether nothing more fits the feasible plan ``x``: no layer can keep one more expert, or move to the next
        wider bit-width, within the budget (what :meth:`repair` ends on)."""
        counts, levels = self.split(x)
        return not self._growth(counts, levels, int(self.bytes(x)))

    def _growth(self, counts: np.ndarray, levels: np.ndarray, total: int) -> list[tuple[int, int, int, int]]:
        """(layer, new count, new level, bytes added) of each one-step growth that fits: one more expert where any
        fits, else one bit-width wider."""
        out = []
        for i in range(len(counts)):
            new = self._next(i, counts[i])
            if new is not None:
                add = (new - counts[i]) * int(self.expert_bytes[i, levels[i]])
                if total + add <= self.budget:
                    out.append((i, new, int(levels[i]), add))
        if out:
            return out
        for i in range(len(counts)):
            if levels[i] > 0:
                add = counts[i] * int(self.expert_bytes[i, levels[i] - 1] - self.expert_bytes[i, levels[i]])
                if total + add <= self.budget:
                    out.append((i, int(counts[i]), int(levels[i]) - 1, add))
        return out

    def _next(self, i: int, count: int) -> int | None:
        lv = self.levels(i)
        above = lv[lv > count]
        return int(above[0]) if len(above) else None

    def _prev(self, i: int, count: int) -> int | None:
        lv = self.levels(i)
        below = lv[lv < count]
        return int(below[-1]) if len(below) else None

    def repair(self, x, rng: np.random.Generator, fill: bool = True) -> np.ndarray:
        """Any vector -> a feasible plan near it: levels clipped, counts snapped to their nearest allowed count, then
        experts removed from random layers while over the budget (a layer at its fewest experts drops to the next
        cheaper bit-width instead), then (``fill``) added to random layers while one more fits, and where none fits a
        random layer moved one bit-width wider while that fits."""
        counts, levels = (a.astype(np.int64).copy() for a in self.split(np.rint(np.asarray(x, dtype=float))))
        levels = np.clip(levels, 0, len(self.bits) - 1)
        counts = np.array([lv[np.argmin(np.abs(lv - c))] for lv, c in
                           ((self.levels(i), c) for i, c in enumerate(counts))], dtype=np.int64)
        total = int(self.bytes(np.concatenate([counts, levels])))
        while total > self.budget:
            down = [i for i in range(len(counts)) if self._prev(i, counts[i]) is not None]
            if down:
                i = int(rng.choice(down))
                new = self._prev(i, counts[i])
                total -= (counts[i] - new) * int(self.expert_bytes[i, levels[i]])
                counts[i] = new
                continue
            cheaper = [i for i in range(len(counts)) if levels[i] < len(self.bits) - 1]
            i = int(rng.choice(cheaper))
            total -= counts[i] * int(self.expert_bytes[i, levels[i]] - self.expert_bytes[i, levels[i] + 1])
            levels[i] += 1
        while fill and (grow := self._growth(counts, levels, total)):
            i, counts[i], levels[i], add = grow[int(rng.integers(len(grow)))]
            total += add
        return np.concatenate([counts, levels])

    def uniform_both(self) -> list[np.ndarray]:
        """Per bit-width, the plan with that bit-width and one count in every layer (the most that fits; on the
        allowed counts), spare bytes given to no layer: the *uniform both* baselines, fewest bits last. Bit-widths at
        which even the fewest experts do not fit are left out."""
        out = []
        n = self.counts.size
        for j in range(len(self.bits)):
            common = sorted(set.intersection(*(set(int(c) for c in self.levels(i)) for i in range(n))))
            best = None
            for c in common:
                x = np.concatenate([np.full(n, c, dtype=np.int64), np.full(n, j, dtype=np.int64)])
                if int(self.bytes(x)) <= self.budget:
                    best = x
            if best is None:            # no common count: each layer at the allowed count nearest the mean
                continue
            out.append(best)
        return out

    # ---- what a study records of a plan (search.study.StudyRecorder) ----
    def memory_bytes(self, x) -> np.ndarray:
        return self.bytes(x)

    def params(self) -> list[tuple[str, int, int]]:
        """(trial param name, low, high): each layer's count, then each layer's bit-width option (index into ``bits``)."""
        n = self.counts.size
        return ([(param_name(l), int(self.levels(i)[0]), int(self.levels(i)[-1])) for i, l in enumerate(self.layers)]
                + [(f"bits_{l:03d}", 0, len(self.bits) - 1) for l in self.layers[:n]])

    def constraints(self, x) -> list[float]:
        """Optuna constraint values (feasible when <= 0): the export's bytes within the budget."""
        return [float(int(self.bytes(x)) - self.budget)]

    def to_plan_fields(self, x) -> tuple[dict[int, int], dict[int, int]]:
        """(layer -> kept count, layer -> bits of each quantized layer) of a joint plan."""
        counts, levels = self.split(x)
        return ({l: int(c) for l, c in zip(self.layers, counts)},
                {l: self.bits[int(j)] for l, j in zip(self.layers, levels) if self.bits[int(j)] is not None})

    def plan(self, x, model_fingerprint: str, ranking, **extra) -> Plan:
        """The :class:`~allocopt.plan.Plan` of joint plan ``x``: each layer's best-ranked experts and its bit-width."""
        counts, bits = self.to_plan_fields(x)
        return Plan.from_counts(model_fingerprint, ranking, self.counts.as_dict(self.counts.num_experts), counts, bits,
                                **extra)


def make_joint_space(counts: AllocationSpace, bits: Sequence[int | None], per_expert: Callable[[int, int | None], int],
                     fixed: int, budget: int) -> JointSpace:
    """The joint space over ``counts``'s layers and bounds with bit-width options ``bits`` (None: the checkpoint's
    precision; sorted from most to fewest bytes); ``per_expert(layer, bits)`` and ``fixed`` from ``ExportSize``."""
    if counts.unit > 1:          # whole routing groups / --count-multiple as allowed counts, so probes respect them too
        top = int(counts.upper.max())
        multiples = [c for c in (counts.allowed or range(1, top + 1)) if c % counts.unit == 0]
        counts = dataclasses.replace(counts, unit=1, allowed=tuple(multiples))
    options = list(dict.fromkeys(bits))
    table = np.array([[per_expert(l, b) for b in options] for l in counts.layers], dtype=np.int64)
    order = np.argsort(-table[0], kind="stable")
    table = table[:, order]
    options = [options[i] for i in order]
    if np.any(np.diff(table, axis=1) >= 0):
        raise AllocoptError(f"bit-width options {options} do not all weigh less than the one before; list distinct widths")
    return JointSpace(counts, tuple(options), table, int(fixed), int(budget))


# ---- the multiple-choice knapsack -------------------------------------------------------------------------------------

def knapsack(costs: list[np.ndarray], weights: list[np.ndarray], capacity: int, resolution: int = 20000
             ) -> list[int] | None:
    """Minimise ``sum_l costs[l][o_l]`` over one option ``o_l`` per layer subject to ``sum_l weights[l][o_l] <=
    capacity`` (a multiple-choice knapsack: Sinha & Zoltners 1979), by dynamic programming over weights rounded *up*
    to units of ``capacity / resolution`` (so the answer always fits; it may leave up to one unit per layer unused).
    Options of infinite cost are never chosen. Returns the option index per layer, or None when nothing fits."""
    unit = max(1, math.ceil(capacity / resolution))
    cap = capacity // unit
    best = np.full(cap + 1, math.inf)
    best[0] = 0.0
    picks = []
    for cost, weight in zip(costs, weights):
        w = -(-np.asarray(weight, dtype=np.int64) // unit)
        new = np.full(cap + 1, math.inf)
        pick = np.full(cap + 1, -1, dtype=np.int64)
        for o in np.flatnonzero(np.isfinite(cost)):
            if w[o] > cap:
                continue
            cand = np.full(cap + 1, math.inf)
            cand[w[o]:] = best[: cap + 1 - w[o]] + cost[o]
            better = cand < new
            new[better], pick[better] = cand[better], o
        best = new
        picks.append(pick)
    s = int(np.argmin(best))
    if not np.isfinite(best[s]):
        return None
    out = [0] * len(costs)
    for l in range(len(costs) - 1, -1, -1):
        o = int(picks[l][s])
        out[l] = o
        s -= int(-(-int(weights[l][o]) // unit))
    return out


def _loss(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    finite = values[np.isfinite(values)]
    return (lambda v: -np.log(v)) if np.all(finite > 0) else (lambda v: -v)


def joint_dp_step(cache: EvaluationCache, space: JointSpace, base: np.ndarray, probes: int, radius: int,
                  previous: np.ndarray | None = None) -> np.ndarray | None:
    """One linearisation around ``base``: probe each layer at ``probes`` counts (``sensitivity.probe_grid`` at its
    bit-width) and at every other bit-width (at its count), model each layer's loss as count loss + bit-width loss,
    solve the knapsack over byte costs, repair the plan into the budget and evaluate it. None when the budget cannot
    pay for the probes and the plan."""
    n, nb = space.counts.size, len(space.bits)
    counts, levels = space.split(base)
    grid = probe_grid(space.counts, counts, probes, radius, None if previous is None else space.split(previous)[0],
                      bounds=previous is None)
    rows = []
    for i, cs in enumerate(grid):
        for c in cs:
            x = np.array(base, dtype=np.int64)
            x[i] = c
            rows.append(x)
    for i in range(n):
        for j in range(nb):
            if j != levels[i]:
                x = np.array(base, dtype=np.int64)
                x[n + i] = j
                rows.append(x)
    if len(rows) + 2 > cache.remaining:
        return None
    base_value = float(cache(np.asarray(base)[None])[0])
    values = cache(np.array(rows, dtype=np.int64)) if rows else np.array([])
    if not np.isfinite(base_value):
        return None
    count_values = values[: sum(len(g) for g in grid)]
    bit_values = values[sum(len(g) for g in grid):]
    count_costs = layer_costs(space.counts, counts, base_value, grid, count_values)
    loss = _loss(np.append(values, base_value))
    costs, weights, options = [], [], []
    at = 0
    for i in range(n):
        span = np.arange(space.counts.lower[i], space.counts.upper[i] + 1)
        bit_cost = np.zeros(nb)
        for j in range(nb):
            if j != levels[i]:
                v = bit_values[at]
                at += 1
                bit_cost[j] = loss(v) - loss(base_value) if np.isfinite(v) else math.inf
        opts = [(int(c), j) for c in span for j in range(nb)]
        costs.append(np.array([count_costs[i][c - span[0]] + bit_cost[j] for c, j in opts]))
        weights.append(np.array([c * space.expert_bytes[i, j] for c, j in opts], dtype=np.int64))
        options.append(opts)
    chosen = knapsack(costs, weights, space.budget - space.fixed)
    if chosen is None:
        return None
    plan = np.array([options[i][o][0] for i, o in enumerate(chosen)] + [options[i][o][1] for i, o in enumerate(chosen)],
                    dtype=np.int64)
    plan = space.repair(plan, np.random.default_rng(0))
    cache(plan[None])
    return plan


def joint_search(evaluate: Callable[[np.ndarray], np.ndarray], space: JointSpace, max_evals: int, seed: int,
                 options: JointOptions = JointOptions(), fidelity: Fidelity | None = None,
                 on_generation: Callable[[float, float], None] | None = None) -> tuple[np.ndarray, float, EvaluationCache]:
    """Search joint plans (module docstring) within ``max_evals`` evaluation equivalents; returns (best plan, its
    value, the cache with every evaluation). ``evaluate``: joint plans [n, 2L] -> values [n] (higher is better);
    ``fidelity``: the same on the first rows (racing; None: every plan scored on all rows)."""
    rng = np.random.default_rng(seed)
    cache = EvaluationCache(evaluate, max_evals, on_generation, fidelity=fidelity, feasible=space.contains)
    schedule = race_schedule(fidelity, options.race_first_rows) if options.racing else None
    offspring = options.offspring or (defaults.GA_RACE_OFFSPRING if schedule else defaults.GA_OFFSPRING)
    starts = space.uniform_both()
    if not starts:
        starts = [space.repair(np.concatenate([space.counts.upper, np.zeros(space.counts.size)]), rng)]
    with cache.phase("uniform"):
        cache(np.array(starts))
    base, _ = cache.best()                          # the cache's best is over feasible plans only (``space.contains``)
    centres = [base]
    if options.warm_start:
        affordable = int((defaults.GA_DP_BUDGET_SHARE * max_evals - 2) // space.counts.size - (len(space.bits) - 1))
        per_layer = min(options.dp_probes or defaults.DP_PROBES, affordable)
        previous = None
        with cache.phase("dp warm start"):
            for _ in range(options.dp_rounds):
                if per_layer < 2:
                    break
                plan = joint_dp_step(cache, space, base, per_layer, options.dp_radius, previous)
                best, _ = cache.best()
                if plan is None or not np.array_equal(best, plan):
                    break
                previous, base = base, plan
                centres.append(plan)
    population = [c for c in {tuple(c): c for c in centres}.values()]
    with cache.phase("ga generations"):
        _generations(cache, space, population, rng, offspring, options, schedule)
    best, value = cache.best()
    return best, value, cache


def _generations(cache: EvaluationCache, space: JointSpace, population: list[np.ndarray], rng: np.random.Generator,
                 offspring: int, options: JointOptions, schedule) -> None:
    """The elitist GA until the budget is spent: after ``patience`` generations without a better plan the move step
    doubles (up to a layer's whole range; reset after an improvement), as ``ga``'s restarts do, so a converged
    population looks further out instead of leaving budget unspent. Ends early only when, ``patience`` stale
    generations into the widest step, a generation breeds no plan that was not scored already."""
    first = step = default_step(space.counts)
    widest = widest_step(space.counts, first)
    stale = 0
    while not cache.exhausted:
        ranked = sorted(((tuple(x), v) for x, v in cache.history if np.isfinite(v) and space.contains(x)),
                        key=lambda item: -item[1])
        parents = [np.array(k) for k, _ in dict(ranked).items()][:options.elites] or population
        before = cache.best()[1]
        children = [_child(space, parents, rng, step) for _ in range(offspring)]
        fresh = [c for k, c in {tuple(int(v) for v in c): c for c in children}.items()
                 if k not in cache.values and k not in cache.pruned]
        if fresh:
            if schedule is not None:
                race(cache, np.array(fresh), schedule, options.race_z)
            else:
                cache(np.array(fresh))
        if cache.best()[1] > before:
            stale, step = 0, next_step(step, first, widest, improved=True)
            continue
        stale += 1
        if stale >= options.patience:
            if step == widest and not fresh:
                return                               # nothing new at the widest step: the neighbourhood is exhausted
            stale, step = 0, next_step(step, first, widest, improved=False)


def joint_front(evaluate: Callable[[np.ndarray], np.ndarray], space: JointSpace, max_evals: int, seed: int,
                population: int = defaults.POPULATION) -> tuple[list[tuple[np.ndarray, float, int]], EvaluationCache]:
    """NSGA-II (Deb et al. 2002, pymoo) over joint plans of at most ``space.budget`` bytes: maximise the objective,
    minimise the export's bytes. Generation 0 holds the uniform-both plans of a ladder of budgets (the smallest plan
    to ``budget``) and random plans repaired without filling, so the front spans sizes; variation is
    :func:`_child`'s, repair keeps plans in the budget without filling them. Returns the non-dominated
    (plan, value, bytes), fewest bytes first, and the cache of every evaluation."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.crossover import Crossover
    from pymoo.core.mutation import Mutation
    from pymoo.core.problem import Problem
    from pymoo.core.repair import Repair
    from pymoo.core.sampling import Sampling
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    from allocopt.search.problem import drive

    cache = EvaluationCache(evaluate, max_evals, feasible=space.contains)
    n = space.counts.size
    step = default_step(space.counts)

    class _Problem(Problem):
        def __init__(self):
            lo = np.concatenate([[space.levels(i)[0] for i in range(n)], np.zeros(n)])
            hi = np.concatenate([[space.levels(i)[-1] for i in range(n)], np.full(n, len(space.bits) - 1)])
            super().__init__(n_var=2 * n, n_obj=2, xl=lo.astype(float), xu=hi.astype(float), vtype=int)
            self.cache = cache

        def _evaluate(self, X, out, *args, **kwargs):
            X = np.asarray(X).astype(np.int64)
            values = cache(X)
            out["F"] = np.column_stack([np.where(np.isfinite(values), -values, np.inf), space.bytes(X)])

    class _Sampling(Sampling):
        def _do(self, problem, n_samples, random_state=None, **kwargs):
            rows = []
            for fraction in np.linspace(0.0, 1.0, 5):
                budget = int(space.min_bytes() + fraction * (space.budget - space.min_bytes()))
                rows += dataclasses.replace(space, budget=budget).uniform_both()
            while len(rows) < n_samples:
                x = np.concatenate([[random_state.choice(space.levels(i)) for i in range(n)],
                                    random_state.integers(0, len(space.bits), n)])
                rows.append(space.repair(x, random_state, fill=False))
            return np.array(list({tuple(r): r for r in rows}.values())[:max(n_samples, 1)])

    class _Crossover(Crossover):
        def __init__(self):
            super().__init__(2, 1)

        def _do(self, problem, X, random_state=None, **kwargs):
            out = np.empty((1, X.shape[1], X.shape[2]), dtype=X.dtype)
            for k in range(X.shape[1]):
                out[0, k] = _child(space, [X[0, k], X[1, k]], random_state, step, fill=False)
            return out

    class _Mutation(Mutation):
        def _do(self, problem, X, random_state=None, **kwargs):
            return X

    class _Repair(Repair):
        def _do(self, problem, X, random_state=None, **kwargs):
            return np.array([space.repair(x, random_state, fill=False) for x in X])

    algorithm = NSGA2(pop_size=max(4, population), sampling=_Sampling(), crossover=_Crossover(),
                      mutation=_Mutation(), repair=_Repair(), eliminate_duplicates=True)
    drive(algorithm, _Problem(), seed)
    done = [(x, v) for x, v in cache.history if np.isfinite(v)]
    if not done:
        raise AllocoptError("every evaluated plan failed (NaN objective); check the objective log above")
    F = np.array([[-v, float(space.bytes(x))] for x, v in done])
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted(((done[i][0], done[i][1], int(F[i, 1])) for i in idx), key=lambda t: t[2]), cache


def _child(space: JointSpace, parents: list[np.ndarray], rng: np.random.Generator, step: int,
           fill: bool = True) -> np.ndarray:
    """Per-layer uniform crossover of two parents' (count, bit-width) pairs, a level-switch move of counts, a
    one-level move of one layer's bit-width (half the time), then byte repair."""
    n = space.counts.size
    a, b = (parents[int(rng.integers(len(parents)))] for _ in range(2))
    take = rng.random(n) < 0.5
    counts, levels = space.split(a)
    counts = np.where(take, space.split(b)[0], counts)
    levels = np.where(take, space.split(b)[1], levels)
    span = None if fill else (int(space.counts.lower.sum()), int(space.counts.upper.sum()))   # fronts: sizes move too
    counts = level_switch(counts, space.counts.lower, space.counts.upper, rng, dmax=step, budget_range=span)
    if rng.random() < 0.5 and len(space.bits) > 1:
        i = int(rng.integers(n))
        levels[i] = int(np.clip(levels[i] + (1 if rng.random() < 0.5 else -1), 0, len(space.bits) - 1))
    return space.repair(np.concatenate([counts, levels]), rng, fill=fill)


__all__ = ["JointOptions", "JointSpace", "joint_options", "joint_dp_step", "joint_front", "joint_search", "knapsack", "make_joint_space"]
