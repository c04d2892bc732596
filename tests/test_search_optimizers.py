"""Every optimizer on a cheap real objective (the toy score): feasibility, elitism, determinism, baselines."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from allocopt.search.optimizers import SearchContext, available_optimizers, get_optimizer
from allocopt.search.optimizers.baselines import global_allocation
from allocopt.search.optimizers.grape import grape_allocation
from allocopt.search.optimizers.nsga2 import budget_range
from allocopt.search.space import make_space
from allocopt.testing.toy import toy_objective
from allocopt.errors import AllocoptError

SEARCHING = ["ga", "evoesap", "cmaes", "tpe", "random", "dp"]
PROBING = ("ga", "dp")          # evaluate sensitivity probes (plans off the budget) besides plans on it


def context(space, seed=0, max_evals=40, population=8, sim_seed=0, **options):
    """A SearchContext whose evaluate records every plan it is asked to score."""
    f = toy_objective(space, seed=1)
    seen = []

    def evaluate(X):
        seen.append(np.array(X, copy=True))
        return f(X)

    rng = np.random.default_rng(sim_seed)
    ranking = {l: list(rng.permutation(int(e))) for l, e in zip(space.layers, space.num_experts)}
    scores = {l: rng.random(int(e)) for l, e in zip(space.layers, space.num_experts)}
    sim = {l: rng.random((int(e), int(e))) for l, e in zip(space.layers, space.num_experts)}
    stats = SimpleNamespace(similarity=sim)          # what grape reads of RoutingStats
    ctx = SearchContext(space, evaluate, seed, max_evals, population, ranking, scores, stats, options=options)
    return ctx, seen, f


@st.composite
def spaces(draw):
    n = draw(st.integers(1, 6))
    experts = draw(st.lists(st.integers(2, 32), min_size=n, max_size=n))
    top_k = [draw(st.integers(1, max(1, e // 2))) for e in experts]
    keep = draw(st.integers(sum(top_k), sum(experts)))
    return make_space(dict(enumerate(experts)), dict(enumerate(top_k)),
                      {i: draw(st.integers(1, 4)) for i in range(n)}, keep=keep)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spaces(), st.integers(0, 1000))
def test_every_optimizer_only_evaluates_feasible_plans(space, seed):
    for name in available_optimizers():
        ctx, seen, _ = context(space, seed=seed, max_evals=24, population=6)
        result = get_optimizer(name).run(ctx)
        plans = np.concatenate(seen)
        assert (plans >= space.lower).all() and (plans <= space.upper).all(), name
        assert len({tuple(p) for p in plans}) == len(plans) == result.evaluations <= 24, name
        if name == "nsga2":
            lo, hi = budget_range(space, (0.25, 0.75))
            assert ((plans.sum(1) >= lo) & (plans.sum(1) <= hi)).all()
            continue
        on_budget = plans[plans.sum(1) == space.budget]
        for probe in plans[plans.sum(1) != space.budget]:     # sensitivity probes: one layer of a plan moved
            assert name in PROBING and (np.count_nonzero(on_budget != probe, axis=1) == 1).any(), (name, probe)
        assert space.contains(result.best), name


@pytest.fixture(scope="module")
def space():
    return make_space({l: 16 for l in range(6)}, {l: 2 for l in range(6)}, {l: 100 + 50 * l for l in range(6)},
                      sparsity=0.5)


@pytest.mark.parametrize("name", SEARCHING)
def test_search_evaluates_uniform_and_never_returns_worse(space, name):
    ctx, seen, f = context(space, max_evals=60)
    result = get_optimizer(name).run(ctx)
    plans = {tuple(p) for p in np.concatenate(seen)}
    assert tuple(space.uniform()) in plans
    assert len(result.history) == result.evaluations
    # dp: uniform, round 1 (6 probes per layer) and its plan at least; later rounds only while the budget pays
    assert (result.evaluations == 60) if name != "dp" else (1 + 6 * 6 + 1 <= result.evaluations <= 60)
    assert result.best_value >= float(f(space.uniform()[None])[0])
    assert result.best_value == max(v for x, v in result.history if x.sum() == space.budget)
    assert float(f(result.best[None])[0]) == pytest.approx(result.best_value)


@pytest.mark.parametrize("name", SEARCHING + ["nsga2"])
def test_same_seed_same_search(space, name):
    a = get_optimizer(name).run(context(space, seed=3, max_evals=30)[0])
    b = get_optimizer(name).run(context(space, seed=3, max_evals=30)[0])
    assert [x.tolist() for x, _ in a.history] == [x.tolist() for x, _ in b.history]


def test_evoesap_generation_sizes_follow_the_paper(space):
    """Generation 0 = P plans (uniform + 11 patterns + random), then P - m children per generation."""
    ctx, seen, _ = context(space, max_evals=32 + 28 * 3, population=32)
    get_optimizer("evoesap").run(ctx)
    assert [len(b) for b in seen][:2] == [32, 28]
    assert tuple(seen[0][0]) == tuple(space.uniform())


def test_nsga2_returns_a_memory_front(space):
    ctx, _, _ = context(space, max_evals=80, population=10)
    result = get_optimizer("nsga2").run(ctx)
    mems = [m for _, _, m in result.front]
    values = [v for _, v, _ in result.front]
    assert len(result.front) >= 3 and mems == sorted(mems)
    assert values == sorted(values)            # more memory only stays on the front if it scores better
    for x, _, m in result.front:
        assert m == int(space.memory_bytes(x))


def test_failed_evaluations_are_skipped_not_chosen(space):
    ctx, _, f = context(space, max_evals=30)
    ctx.evaluate = lambda X: np.where(np.asarray(X)[:, 0] > 8, np.nan, f(X))
    result = get_optimizer("ga").run(ctx)
    assert np.isfinite(result.best_value) and result.best[0] <= 8
    ctx.evaluate = lambda X: np.full(len(X), np.nan)
    with pytest.raises(AllocoptError):
        get_optimizer("ga").run(ctx)


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(AllocoptError, match="ga, evoesap"):
        get_optimizer("annealing")


def test_global_ranking_keeps_the_globally_best_experts():
    space = make_space({0: 4, 1: 4}, {0: 1, 1: 1}, {0: 1, 1: 1}, keep=5)
    scores = {0: np.array([9.0, 8.0, 7.0, 6.0]), 1: np.array([1.0, 0.1, 0.1, 0.1])}
    ranking = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    # normalised by layer mean: layer 0 -> 1.2, 1.07, 0.93, 0.8; layer 1 -> 3.08, 0.31, ...
    # lower bounds take 0:[0] and 1:[0]; the next three best are layer 0's experts 1, 2, 3
    assert global_allocation(space, ranking, scores).tolist() == [4, 1]


@settings(max_examples=30, deadline=None)
@given(spaces(), st.integers(0, 1000))
def test_global_and_grape_respect_budget_and_bounds(space, seed):
    ctx, _, _ = context(space, sim_seed=seed)
    assert space.contains(global_allocation(space, ctx.ranking, ctx.scores))
    assert space.contains(grape_allocation(space, ctx.stats.similarity, ctx.ranking))


def test_grape_entropy_guard_prevents_hollowing_out_a_redundant_layer():
    space = make_space({l: 32 for l in range(3)}, {l: 1 for l in range(3)}, {l: 1 for l in range(3)}, sparsity=0.5)
    rng = np.random.default_rng(0)
    sim = {l: rng.uniform(0.0, 0.1, (32, 32)) for l in range(3)}
    sim[1] = np.full((32, 32), 0.99)                       # layer 1: every expert duplicates every other

    def entropy(x):
        p = x / x.sum()
        return float(-(p * np.log(p)).sum())

    floor = 0.9 * np.log(3)                                # (1 - gamma) * H0 with gamma = 0.1, H0 = log 3
    unguarded = grape_allocation(space, sim, gamma=1.0)    # threshold 0: never freezes
    guarded = grape_allocation(space, sim, gamma=0.1)
    assert entropy(unguarded) < floor and unguarded[1] == unguarded.min()
    assert entropy(guarded) >= floor and guarded.sum() == space.budget
    assert unguarded[1] < guarded[1] == guarded.min()     # still the most pruned layer, but not hollowed out


def test_baselines_evaluate_their_single_plan(space):
    for name in ["uniform", "global", "grape"]:
        ctx, seen, f = context(space)
        result = get_optimizer(name).run(ctx)
        assert result.evaluations == 1 and len(seen) == 1 and space.contains(result.best)
        assert result.best_value == pytest.approx(float(f(result.best[None])[0]))
    assert get_optimizer("uniform").run(context(space)[0]).best.tolist() == space.uniform().tolist()


@pytest.mark.parametrize("name", ["ga", "cmaes"])
def test_progress_callback_sees_growing_evaluations_and_best(space, name):
    ctx, _, _ = context(space, max_evals=40)
    calls = []
    ctx.on_generation = lambda n, best: calls.append((n, best))
    result = get_optimizer(name).run(ctx)
    counts, bests = [c for c, _ in calls], [b for _, b in calls]
    assert counts == sorted(counts) and counts[-1] == result.evaluations == 40
    assert bests == sorted(bests) and bests[-1] == result.best_value


def test_impossible_search_settings_raise_before_evaluating(space):
    ctx, seen, _ = context(space, max_evals=0)
    with pytest.raises(AllocoptError):
        get_optimizer("ga").run(ctx)
    ctx, seen, _ = context(make_space({0: 8, 1: 8}, {0: 4, 1: 4}, {0: 1, 1: 1}, keep=12), sparsity_range=(0.9, 0.95))
    with pytest.raises(AllocoptError, match="sparsity range"):
        get_optimizer("nsga2").run(ctx)
    assert seen == []
