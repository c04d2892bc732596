"""Experts and bit-widths under one byte budget (issue 23, item 3): the joint space's byte repair, the multiple-choice
knapsack and the joint search on the testbed, priced by the export's size model."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from allocopt.errors import AllocoptError
from allocopt.search.joint import JointSpace, joint_front, joint_search, knapsack, make_joint_space
from allocopt.search.space import make_space

BITS = (None, 8, 4)


def _space(allowed=None, unit: int = 1, ratio: float = 0.3) -> JointSpace:
    layers = {0: 16, 1: 16, 2: 16, 3: 16}
    counts = make_space(layers, {l: 2 for l in layers}, {l: 1 for l in layers}, sparsity=0.5, unit=unit,
                        allowed_counts=allowed)
    per = {None: 1000, 8: 260, 4: 140}                   # bytes one expert adds at each bit-width
    full = 64 * 1000
    return make_joint_space(counts, BITS, lambda l, b: per[b] + 7 * l, 5000, 5000 + int(ratio * full))


@pytest.mark.parametrize("allowed,unit", [(None, 1), ((4, 8, 12, 16), 1), (None, 2)])
def test_repair_sends_any_vector_to_a_feasible_plan_nothing_more_fits(allowed, unit):
    rng = np.random.default_rng(0)
    for ratio in (0.08, 0.3, 0.7):
        js = _space(allowed, unit, ratio)
        for _ in range(200):
            x = np.concatenate([rng.integers(-3, 20, 4), rng.integers(-1, 4, 4)])
            y = js.repair(x, rng)
            assert js.contains(y) and js.filled(y), (x, y)       # in budget, and no expert or wider bit-width fits
            counts, levels = js.split(y)
            assert all(c % unit == 0 for c in counts) and (allowed is None or set(counts) <= set(allowed))


def test_a_budget_below_the_smallest_plan_is_refused():
    with pytest.raises(AllocoptError, match="over the budget"):
        _space(ratio=0.001)


def test_the_knapsack_is_the_exact_optimum_of_small_instances():
    rng = np.random.default_rng(3)
    for _ in range(40):
        layers, options = 3, 4
        costs = [rng.random(options) for _ in range(layers)]
        costs[0][rng.integers(options)] = np.inf
        weights = [rng.integers(1, 30, options) for _ in range(layers)]
        capacity = int(rng.integers(10, 70))
        best, arg = np.inf, None
        for pick in itertools.product(range(options), repeat=layers):
            w = sum(weights[l][o] for l, o in enumerate(pick))
            c = sum(costs[l][o] for l, o in enumerate(pick))
            if w <= capacity and c < best:
                best, arg = c, pick
        got = knapsack(costs, weights, capacity, resolution=capacity)
        if arg is None:
            assert got is None
        else:
            assert sum(costs[l][o] for l, o in enumerate(got)) == pytest.approx(best)
            assert sum(weights[l][o] for l, o in enumerate(got)) <= capacity


def test_the_joint_ga_spends_its_budget_past_a_converged_population():
    """A population that stops improving widens its step (as ga's restarts do) instead of ending the search with
    budget left: the GA used to stop after 3 x patience stale generations, at 169-210 of these 400 evaluations."""
    js = _space()
    target = np.array([12, 6, 9, 3])

    def evaluate(X):                      # one peak in counts; every quantized layer costs a little
        c, b = np.atleast_2d(X)[:, :4], np.atleast_2d(X)[:, 4:]
        return np.exp(-0.02 * ((c - target) ** 2).sum(1) - 0.05 * b.sum(1))

    for seed in (0, 1):
        best, value, cache = joint_search(evaluate, js, 400, seed=seed)
        assert 390 <= cache.spent <= 400 and js.contains(best), (seed, cache.spent)
        assert value == max(v for x, v in cache.history if js.contains(x))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from allocopt.config import RunConfig
    from allocopt.export.size import export_size
    from allocopt.pipeline.prepare import prepare

    config = RunConfig.from_sources(None, {"criterion": "reap", "sparsity": 0.5, "search_num_seqs": 4,
                                           "out": str(tmp_path_factory.mktemp("jt") / "run"), "run_name": "jt"})
    p = prepare(config, progress=False)
    return p, export_size(p.model, bits=(8, 4))


def test_the_joint_search_on_the_testbed_stays_in_the_byte_budget_and_beats_one_bit_width(testbed):
    p, size = testbed
    expert_bytes = sum(n * size.per_expert[l] for l, n in size.num_experts.items())
    budget = size.full - expert_bytes + expert_bytes // 4
    js = make_joint_space(p.space, BITS, size.expert_bytes, size.base, budget)

    def evaluate(X):
        return np.array([v.value for v in p.evaluator.evaluate([js.plan(x, p.info.fingerprint, p.ranking)
                                                                for x in np.atleast_2d(X)])])

    best, value, cache = joint_search(evaluate, js, 60, seed=1)
    plan = js.plan(best, p.info.fingerprint, p.ranking)
    assert js.contains(best) and size.bytes(dict(zip(js.layers, plan.counts)), plan.bits) == int(js.bytes(best)) <= budget
    uniform = evaluate(np.array(js.uniform_both()))
    assert value >= np.nanmax(uniform)                         # the uniform-both plans are evaluated first
    assert cache.spent <= 60 and set(cache.phases) >= {"uniform", "dp warm start", "ga generations"}
    assert plan.bits                                             # a quarter of the fp32 bytes needs quantized layers


def test_the_joint_front_spans_sizes_within_the_budget_and_is_non_dominated(testbed):
    p, size = testbed
    expert_bytes = sum(n * size.per_expert[l] for l, n in size.num_experts.items())
    js = make_joint_space(p.space, BITS, size.expert_bytes, size.base, size.full - expert_bytes + expert_bytes // 2)

    def evaluate(X):
        return np.array([v.value for v in p.evaluator.evaluate([js.plan(x, p.info.fingerprint, p.ranking)
                                                                for x in np.atleast_2d(X)])])

    front, cache = joint_front(evaluate, js, 40, seed=2, population=8)
    assert len(front) >= 3 and cache.spent <= 40
    sizes, values = [b for _, _, b in front], [v for _, v, _ in front]
    assert sizes == sorted(sizes) and values == sorted(values)          # more bytes buy a higher ESAP along the front
    assert all(js.contains(x) and int(js.bytes(x)) == b for x, _, b in front)
    assert sizes[0] < js.budget // 2 < sizes[-1]                          # from small plans up to the budget
    assert {len(set(js.split(x)[1])) for x, _, _ in front} != {1}          # bit-widths mixed within some plans
