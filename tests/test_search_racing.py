"""Racing (successive halving on nested row subsets) and the sensitivity DP, on cheap real objectives: the
multi-fidelity toy (rows with noise) and brute force over small knapsacks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.fidelity import RowGrid
from allocopt.search.optimizers import SearchContext, get_optimizer
from allocopt.search.optimizers.dp import ProbeBudget, probe_budget
from allocopt.search.problem import EvaluationCache
from allocopt.search.racing import RaceSchedule, race
from allocopt.search.sampling import random_composition
from allocopt.search.sensitivity import dp_allocate, extend_grid, layer_costs, probe_grid, probe_plans, sensitivity_search, sensitivity_step
from allocopt.search.space import make_space
from allocopt.testing.toy import ToyRows, toy_objective


@pytest.fixture()
def space():
    return make_space({l: 16 for l in range(6)}, {l: 2 for l in range(6)}, {l: 1 for l in range(6)}, sparsity=0.5)


def _plans(space, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([random_composition(space.lower, space.upper, space.budget, rng) for _ in range(n)])


def test_halving_schedule_and_bad_schedules():
    s = RaceSchedule.halving(16, 4)
    assert s.rows == (4, 8, 16) and s.keep == (0.25, 0.5)
    assert RaceSchedule.halving(16, 4, first=6).rows == (8, 16)
    assert RaceSchedule.halving(4, 4).rows == (4,)
    for rows, keep in (((8, 4), (0.5,)), ((4, 8), (0.0,)), ((4, 8), ()), ((0, 8), (0.5,))):
        with pytest.raises(AllocoptError):
            RaceSchedule(rows, keep)


def test_race_gives_survivors_their_full_value_and_pays_each_row_once(space):
    rows = ToyRows(space, rows=16, step=4, noise=0.02)
    cache = EvaluationCache(rows.full, 100, fidelity=rows)
    X = _plans(space, 16)
    values = race(cache, X, RaceSchedule.halving(16, 4))
    survivors = np.isfinite(values)
    assert survivors.sum() == 2                                   # 16 -> 4 at 4 rows -> 2 at 8 rows -> full
    assert values[survivors] == pytest.approx(rows.full(X[survivors]))
    assert len(rows.pruned) == 14 and set(rows.pruned) == {tuple(x) for x in X[~survivors]}
    assert rows.rows_scored == 16 * 4 + 4 * 4 + 2 * 8            # promotions only run the rows they add
    assert cache.spent == pytest.approx(rows.rows_scored / 16) and cache.evaluations == 2
    # the two survivors were the best at 8 rows among the four promoted from the first stage
    assert len(cache.pruned) == 14
    again = race(cache, X, RaceSchedule.halving(16, 4))           # nothing is raced twice
    assert np.array_equal(np.isfinite(again), survivors) and rows.rows_scored == 96


def test_race_z_drops_entrants_clearly_worse_than_the_incumbent(space):
    rows = ToyRows(space, rows=16, step=4, noise=0.001)
    best = space.uniform()
    X = _plans(space, 12, seed=3)
    cache = EvaluationCache(rows.full, 100, fidelity=rows)
    cache(best[None])
    incumbent = rows.full(best[None])[0]
    worse = rows.full(X) < incumbent - 0.02                      # far below, many standard errors
    assert worse.sum() >= 6
    values = race(cache, X, RaceSchedule.halving(16, 4, keep_first=1.0, keep_next=1.0), z=3.0)
    assert not np.isfinite(values[worse]).any()                   # never promoted to all rows
    assert (rows.full(X[np.isnan(values)]) < incumbent).all()      # and nothing better than the incumbent dropped


def test_race_stops_at_the_budget_and_prunes_what_it_could_not_finish(space):
    rows = ToyRows(space, rows=16, step=4)
    cache = EvaluationCache(rows.full, 3, fidelity=rows)          # 16 x 0.25 > 3: not even the first stage fits
    values = race(cache, _plans(space, 16), RaceSchedule.halving(16, 4))
    assert cache.exhausted and cache.spent <= 3 + 1e-9 and np.isnan(values).all()
    assert cache.evaluations == 0 and len(rows.pruned) == len(cache.scores) == 12


def test_a_radius_grid_keeps_the_dp_where_it_was_measured(space):
    base = np.array([3, 8, 8, 8, 8, 13])
    grid = probe_grid(space, base, 12, radius=2)
    assert [g.tolist() for g in grid] == [[2, 4, 5], *[[6, 7, 9, 10]] * 4, [11, 12, 14, 15]]   # bounds 2..16 clip
    f = toy_objective(space, seed=1)
    costs = layer_costs(space, base, float(f(base[None])[0]), grid, f(probe_plans(base, grid)))
    for l, cost in enumerate(costs):
        span = np.arange(space.lower[l], space.upper[l] + 1)
        assert np.isinf(cost[np.abs(span - base[l]) > 2]).all() and np.isfinite(cost[np.abs(span - base[l]) <= 2]).all()
    x = dp_allocate(costs, space.lower, space.upper, space.budget)
    assert x.sum() == space.budget and (np.abs(x - base) <= 2).all()


def test_trust_region_rounds_improve_on_the_first_dp_plan_and_probe_near_the_last_one(space):
    """An interacting objective: the additive model around uniform is off, re-linearising around the DP plan finds
    better plans. Round 1 probes the near grid and the bounds; every later evaluation is a DP plan (on the budget)
    or a one-layer move from the round's base; each DP plan is evaluated as soon as it is solved."""
    f = toy_objective(space, seed=0)
    found = {}
    for rounds in (1, 4):
        cache = EvaluationCache(f, 1000)
        cache(space.uniform()[None])
        plan = sensitivity_search(cache, space, space.uniform(), 6, rounds, radius=2)
        found[rounds] = (plan, cache)
    one, four = found[1][1], found[4][1]
    first = probe_plans(space.uniform(), probe_grid(space, space.uniform(), 6, 2, bounds=True))
    assert np.array_equal(np.array([x for x, _ in one.history[1:1 + len(first)]]), first)
    assert one.history[1 + len(first)][0].sum() == space.budget             # round 1's DP plan, before any extension
    assert np.array_equal(found[1][0], one.best(space.budget)[0])
    assert four.best(space.budget)[1] > one.best(space.budget)[1] + 1e-3
    assert np.array_equal(found[4][0], four.best(space.budget)[0])
    plans = [x for x, _ in four.history if x.sum() == space.budget]
    for x, _ in four.history[1:]:
        if x.sum() != space.budget:                                        # a probe: one layer off some plan
            assert min(np.count_nonzero(x - p) for p in plans) == 1
    # round 2 starts with the asymmetric trust region around round 1's plan
    second = probe_plans(found[1][0], probe_grid(space, found[1][0], 6, 2, previous=space.uniform()))
    at = next(i for i, (x, _) in enumerate(four.history) if not any(np.array_equal(x, y) for y, _ in one.history))
    assert np.array_equal(np.array([x for x, _ in four.history[at:at + len(second)]]), second)
    limited = EvaluationCache(f, 1000)
    limited(space.uniform()[None])
    sensitivity_search(limited, space, space.uniform(), 6, 4, radius=2, allowance=40)
    assert limited.spent <= 1 + 40


def test_later_rounds_probe_an_asymmetric_trust_region_and_extend_it_at_its_edges(space):
    base, previous = np.array([3, 10, 8, 8, 6, 13]), np.array([2, 8, 8, 9, 8, 13])
    grid = probe_grid(space, base, 6, 2, previous)
    # moved up: two further up, one back; unmoved: one each way; moved down: two further down, one back
    assert [g.tolist() for g in grid] == [[2, 4, 5], [9, 11, 12], [7, 9], [6, 7, 9], [4, 5, 7], [12, 14]]
    assert [g.tolist() for g in probe_grid(space, space.uniform(), 6, 2, bounds=True)] == [[2, 6, 7, 9, 10, 16]] * 6
    # whole steps only, the bounds right after +-1: a short budget keeps them, never one side of a step
    assert [g.tolist() for g in probe_grid(space, space.uniform(), 5, 3, bounds=True)] == [[2, 7, 9, 16]] * 6
    assert [g.tolist() for g in probe_grid(space, space.uniform(), 3, 2)] == [[7, 9]] * 6
    with pytest.raises(AllocoptError, match="at least 2 probes"):
        probe_grid(space, space.uniform(), 1, 2)
    base = np.full(6, 8)
    grid = [np.array([6, 7, 9, 10])] * 3 + [np.array([5, 6, 7, 9, 10, 11]), np.array([7, 9, 11, 13]), np.array([9, 16])]
    plan = np.array([10, 9, 8, 5, 13, 16])
    # at an upper edge: the next Fibonacci offset past it (2 -> 3); interior or unmoved: nothing;
    # at a lower edge: 3 -> 5; at 13 (offset 5): 8 -> 16; at the layer's bound: nothing
    assert [g.tolist() for g in extend_grid(space, base, grid, plan)] == [[11], [], [], [3], [16], []]
    high = extend_grid(space, np.full(6, 12), [np.array([11, 13, 14])] * 6, np.full(6, 14))
    assert all(g.tolist() == [15] for g in high)
    assert all(g.tolist() == [16] for g in extend_grid(space, np.full(6, 12), [np.array([11, 13, 14, 15])] * 6,
                                                       np.full(6, 15)))              # 12 + 5 = 17 clips to 16


def test_the_bounds_let_round_1_see_a_layer_whose_value_lies_far_from_uniform(space):
    """Layer 0 gains nothing until it keeps 14 experts (EAN at 50% on the testbed moves layer 0 from 8 to 15): a grid
    near uniform never sees it, round 1's bound probes do, and the trust region then finds the exact optimum."""
    slope = np.array([0.0, 0.01, 0.012, 0.014, 0.016, 0.018])

    def f(X):
        X = np.atleast_2d(X)
        return np.exp(-0.4 * (X[:, 0] < 14) - (slope * (16 - X)).sum(1))

    brute = max((y for y in itertools.product(*[range(lo, hi + 1) for lo, hi in zip(space.lower, space.upper)])
                 if sum(y) == space.budget), key=lambda y: f(np.array(y)[None])[0])
    assert brute[0] >= 14
    near = EvaluationCache(f, 1000)
    near(space.uniform()[None])
    grid = probe_grid(space, space.uniform(), 6, 2)
    assert sensitivity_step(near, space, space.uniform(), grid)[0] < 14
    cache = EvaluationCache(f, 1000)
    cache(space.uniform()[None])
    assert tuple(sensitivity_search(cache, space, space.uniform(), 6, rounds=4, radius=2)) == brute


def test_partial_row_probes_are_pruned_trials_and_dp_plans_get_full_values(space):
    """``dp_rows``: every probe (extensions too) is scored on the first rows only and ends PRUNED; the base and the
    DP plans are scored on all rows; the allowance caps all of it."""
    rows = ToyRows(space, rows=16, step=4, noise=0.002)
    cache = EvaluationCache(rows.full, 1000, fidelity=rows)
    cache(space.uniform()[None])
    plan = sensitivity_search(cache, space, space.uniform(), 6, 4, rows=4, radius=2, allowance=60)
    assert plan is not None and cache.spent <= 1 + 60 + 1e-9
    assert cache.pruned and all(sum(p) != space.budget for p in cache.pruned)
    assert all(x.sum() == space.budget for x, _ in cache.history)       # only on-budget plans have full values
    assert tuple(plan) in cache.values and len(cache.history) > 2
    assert cache.spent == pytest.approx(len(cache.history) + len(cache.pruned) * 4 / 16)   # a probe costs 4 of 16 rows


@pytest.mark.parametrize("layers, fidelity, options, expected", [
    (6, True, {}, ProbeBudget(6, None)),              # the testbed: 36 full-row probes fit a third of 300
    (48, True, {}, ProbeBudget(2, None)),             # Qwen3-30B-A3B's depth: +-1 only
    (58, True, {}, ProbeBudget(1, None)),             # DeepSeek-V3's: too few for a grid, the warm start is skipped
    (58, True, {"dp_rows": 4}, ProbeBudget(6, 4)),    # 4 of 16 rows: a probe costs 1/4, 6 x 58 / 4 fit
    (94, True, {"dp_rows": 3}, ProbeBudget(4, 3)),    # rounded up to a micro-batch of 4 rows
    (58, True, {"dp_rows": 12, "dp_probes": 2}, ProbeBudget(2, 12)),
    (58, False, {"dp_rows": 4}, ProbeBudget(1, 4)),   # no partial scoring (a worker queue): all rows are paid
])
def test_the_warm_starts_probes_per_layer_are_what_its_share_pays_for_on_its_rows(layers, fidelity, options,
                                                                                  expected):
    deep = make_space({l: 64 for l in range(layers)}, {l: 8 for l in range(layers)}, {l: 1 for l in range(layers)},
                      sparsity=0.5)
    ctx = SearchContext(deep, None, 0, 300, 8, {}, {}, None, fidelity=ToyRows(deep) if fidelity else None)
    opts = get_optimizer("ga").parse(options)
    assert probe_budget(ctx, opts, share=defaults.GA_DP_BUDGET_SHARE) == expected


def test_a_deep_models_warm_start_runs_on_partial_rows_when_asked():
    """58 MoE layers at the default 300 evaluations: a third of the budget pays for one full-row probe per layer,
    so the warm start is skipped (the GA alone did as well at such budgets per layer); with ``dp_rows=4`` it probes
    6 counts per layer on 4 of 16 rows (PRUNED trials), stays within its third and starts the GA from a DP plan
    above uniform."""
    deep = make_space({l: 64 for l in range(58)}, {l: 8 for l in range(58)}, {l: 1 for l in range(58)}, sparsity=0.5)

    def run(options):
        rows = ToyRows(deep, rows=16, step=4, noise=0.002)
        ctx = SearchContext(deep, rows.full, 0, 300, 8, {}, {}, None, options=options, fidelity=rows)
        optimizer = get_optimizer("ga")
        cache = ctx.cache(probes=True)
        warm = optimizer._warm_start(ctx, optimizer.parse(options), cache, deep.uniform())
        return warm, cache, rows

    warm, cache, rows = run({"dp_rows": 4})
    probes = [p for p in cache.pruned if sum(p) != deep.budget]
    assert len(probes) >= 6 * 58 and cache.spent <= 300 / 3 + 1e-9
    assert warm is not None and deep.contains(warm)
    assert rows.full(warm[None])[0] > rows.full(deep.uniform()[None])[0]
    skipped, cache, _ = run({})
    assert skipped is None and cache.spent == 0


def test_ga_races_by_default_and_sees_more_plans_for_the_same_budget(space):
    def ctx(racing):
        rows = ToyRows(space, rows=16, step=4, noise=0.005)
        seen = []

        def evaluate(X):
            seen.append(len(X))
            return rows.full(X)

        return SearchContext(space, evaluate, 5, 60, 8, {}, {}, None, options={"racing": racing, "warm_start": False},
                             fidelity=rows), rows, seen

    raced, rows, _ = ctx(True)
    a = get_optimizer("ga").run(raced)
    plain, _, seen = ctx(False)
    b = get_optimizer("ga").run(plain)
    assert a.spent == pytest.approx(rows.rows_scored / 16) and 59 <= a.spent <= 60
    assert b.spent == b.evaluations == sum(seen) == 60 and b.pruned == 0
    assert a.pruned + a.evaluations > 2 * b.evaluations           # racing decided on far more candidates
    assert space.contains(a.best) and a.best_value == max(v for x, v in a.history if x.sum() == space.budget)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000))
def test_dp_allocate_is_the_exact_optimum(n, seed):
    rng = np.random.default_rng(seed)
    lower = rng.integers(0, 3, n)
    upper = lower + rng.integers(0, 5, n)
    budget = int(rng.integers(lower.sum(), upper.sum() + 1))
    costs = [rng.normal(size=hi - lo + 1) for lo, hi in zip(lower, upper)]
    x = dp_allocate(costs, lower, upper, budget)
    total = lambda y: sum(c[v - lo] for c, v, lo in zip(costs, y, lower))
    best = min(total(y) for y in itertools.product(*[range(lo, hi + 1) for lo, hi in zip(lower, upper)])
               if sum(y) == budget)
    assert x.sum() == budget and (x >= lower).all() and (x <= upper).all()
    assert total(x) == pytest.approx(best)
    with pytest.raises(AllocoptError):
        dp_allocate(costs, lower, upper, int(upper.sum()) + 1)


def test_additive_model_recovers_a_separable_objective(space):
    """On an objective that *is* a product over layers, probes at every count give the exact optimum in one round,
    and the default trust region (fewer probes per round) gets there by re-linearising."""
    rng = np.random.default_rng(0)
    gain = rng.uniform(0.02, 0.3, space.size)

    def f(X):
        return np.exp(-(gain * np.exp(-np.atleast_2d(X) / 4)).sum(1))

    base = space.uniform()
    brute = max((y for y in itertools.product(*[range(lo, hi + 1) for lo, hi in zip(space.lower, space.upper)])
                 if sum(y) == space.budget), key=lambda y: f(np.array(y)[None])[0])
    every = probe_grid(space, base, 14, radius=14)                # radius >= the range: every count
    assert all(g.tolist() == [c for c in range(2, 17) if c != 8] for g in every)
    costs = layer_costs(space, base, float(f(base[None])[0]), every, f(probe_plans(base, every)))
    assert tuple(dp_allocate(costs, space.lower, space.upper, space.budget)) == brute

    cache = EvaluationCache(f, 1000)
    cache(base[None])
    plan = sensitivity_search(cache, space, base, 6, rounds=4, radius=2)                   # the defaults
    assert tuple(plan) == brute


def test_dp_budget_check_prices_probes_on_the_rows_they_are_scored_on(space):
    """Two probes per layer on 4 of 16 rows cost 6 x 2 x 1/4 = 3 evaluations besides the uniform and DP plans, so 8
    pays for them; on all rows they need 14, which the check before loading (and the run) refuses in one line."""
    rows = ToyRows(space, rows=16, step=4, noise=0.002)
    optimizer = get_optimizer("dp")
    optimizer.check(space, 8, {"dp_rows": 4, "dp_probes": 2})
    result = optimizer.run(SearchContext(space, rows.full, 0, 8, 8, {}, {}, None,
                                         options={"dp_rows": 4, "dp_probes": 2}, fidelity=rows))
    assert result.spent <= 8 + 1e-9 and result.pruned >= 2 * space.size
    assert result.best_value >= rows.full(space.uniform()[None])[0] and space.contains(result.best)
    with pytest.raises(AllocoptError, match=r"dp needs at least 14 evaluations .*2 probes per layer"):
        optimizer.check(space, 8, {"dp_probes": 2})
    with pytest.raises(AllocoptError, match=r"dp needs at least 5 evaluations .*2 probes per layer .* on 4 rows"):
        optimizer.run(SearchContext(space, rows.full, 0, 4, 8, {}, {}, None, options={"dp_rows": 4, "dp_probes": 2},
                                    fidelity=rows))


@pytest.mark.parametrize("name, options", [("dp", {"dp_rows": 17}), ("ga", {"dp_rows": 17}),
                                           ("ga", {"race_first_rows": 20})])
def test_row_options_above_the_search_set_are_refused_not_read_as_all_rows(space, name, options):
    """``dp_rows`` or ``race_first_rows`` above the 16 search rows would silently score every plan on all rows (no
    partial scoring); the library refuses them at the run as the runner does before writing, and accepts 16."""
    rows = ToyRows(space, rows=16, step=4, noise=0.002)
    optimizer = get_optimizer(name)
    (option, value), = options.items()
    with pytest.raises(AllocoptError, match=rf"--option {option}={value} is more than the search set's 16 rows"):
        optimizer.run(SearchContext(space, rows.full, 0, 40, 8, {}, {}, None, options=options, fidelity=rows))
    optimizer.check_budget(space, 40, {option: 16}, RowGrid(16, 4))
