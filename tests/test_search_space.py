"""Allocation space, apportionment and the pymoo operators: every candidate is feasible by construction."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from allocopt.errors import AllocoptError
from allocopt.search.mutation import default_step, level_switch, next_step, widest_step
from allocopt.search.repair import repair_counts
from allocopt.search.rounding import largest_remainder
from allocopt.search.sampling import PATTERNS, pattern_counts, random_composition
from allocopt.search.space import make_space


@st.composite
def spaces(draw):
    """Random MoE shapes (L, E_l, top-k_l) and a feasible budget anywhere in the allowed range."""
    n = draw(st.integers(1, 8))
    experts = draw(st.lists(st.integers(2, 64), min_size=n, max_size=n))
    top_k = [draw(st.integers(1, e)) for e in experts]
    lo, hi = sum(top_k), sum(experts)
    keep = draw(st.integers(lo, hi))
    return make_space(dict(enumerate(experts)), dict(enumerate(top_k)), {i: 10 for i in range(n)}, keep=keep)


def test_sparsity_budget_and_bounds():
    space = make_space({1: 16, 3: 16, 5: 8}, {1: 2, 3: 2, 5: 2}, {1: 1, 3: 1, 5: 4}, sparsity=0.5,
                       min_density=0.25)
    assert space.layers == (1, 3, 5) and space.budget == 20
    assert space.lower.tolist() == [4, 4, 2] and space.upper.tolist() == [16, 16, 8]
    assert space.uniform().tolist() == [8, 8, 4] and space.contains(space.uniform())
    assert int(space.memory_bytes(space.uniform())) == 8 + 8 + 16


@pytest.mark.parametrize("kwargs", [
    {"sparsity": 0.95},                                  # keeps 2 < sum(top_k) = 4
    {"keep": 33},                                        # more than exists
    {"sparsity": 0.5, "keep": 16},                       # both given
    {"sparsity": 0.5, "min_density": 0.9, "max_density": 0.5},
    {"sparsity": 0.5, "max_density": 0.05},              # upper bound below top-k
])
def test_impossible_budgets_raise_before_anything_runs(kwargs):
    with pytest.raises(AllocoptError):
        make_space({0: 16, 1: 16}, {0: 2, 1: 2}, {0: 1, 1: 1}, **kwargs)


def test_impossible_budget_message_names_range_and_fix():
    with pytest.raises(AllocoptError, match=r"4\.\.32.*choose a sparsity"):
        make_space({0: 16, 1: 16}, {0: 2, 1: 2}, {0: 1, 1: 1}, keep=3)


TESTBED = ({l: 16 for l in range(6)}, {l: 4 for l in range(6)}, {l: 1 for l in range(6)})   # 6 layers, 16 experts, top-4


def test_a_count_multiple_with_no_count_in_a_layer_is_named_with_its_fix():
    with pytest.raises(AllocoptError) as err:
        make_space(*TESTBED, sparsity=0.5, unit=32)
    assert str(err.value) == ("a count multiple of 32 (--count-multiple or routing groups) leaves no count between 4 and 16 "
                              "experts (top-k, what the router needs, density bounds) in layer 0 (and 5 more); use a "
                              "--count-multiple that divides 16")
    with pytest.raises(AllocoptError, match="widen the density bounds"):        # the bounds alone are empty: not the step
        make_space(*TESTBED, sparsity=0.5, unit=2, max_density=0.2)


def test_a_count_multiple_that_cannot_meet_the_budget_is_named():
    with pytest.raises(AllocoptError) as err:
        make_space(*TESTBED, sparsity=0.5, unit=16)
    assert str(err.value) == ("with a count multiple of 16 (--count-multiple or routing groups) every layer keeps 16 experts "
                              "(96 in all), so sparsity 0.5 (48 experts) cannot be met; lower --count-multiple or the sparsity")
    with pytest.raises(AllocoptError, match=r"keeping 40 experts cannot be met; lower --count-multiple or keep more"):
        make_space(*TESTBED, keep=40, unit=16)
    with pytest.raises(AllocoptError, match=r"relax min_density/max_density"):   # unreachable without the step too
        make_space(*TESTBED, keep=20, unit=2)


def test_allowed_counts_that_empty_a_layer_or_the_budget_are_named():
    with pytest.raises(AllocoptError) as err:
        make_space(*TESTBED, sparsity=0.5, allowed_counts=[32])
    assert str(err.value) == ("layer 0 keeps 4..16 experts (top-k, what its router needs, density bounds) but no allowed count "
                              "lies there (--allowed-counts 32); add one in that range")
    with pytest.raises(AllocoptError, match=r"no allowed count that is a multiple of 8 \(--count-multiple or routing groups\) "
                                            r"lies there \(--allowed-counts 12\)"):
        make_space(*TESTBED, sparsity=0.5, unit=8, allowed_counts=[12])
    with pytest.raises(AllocoptError, match=r"with --allowed-counts 16 the total nearest the budget keeps all 96"):
        make_space(*TESTBED, sparsity=0.5, allowed_counts=[16])
    with pytest.raises(AllocoptError, match=r"no plan of --allowed-counts 16 keeps 63 experts or fewer.*allow smaller counts"):
        make_space(*TESTBED, keep=63, allowed_counts=[16], at_most=True)


def test_sparsity_that_rounds_to_no_expert_is_refused_naming_the_least_that_removes_one():
    with pytest.raises(AllocoptError) as err:
        make_space({0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, {0: 1, 1: 1, 2: 1}, sparsity=0.01)
    assert str(err.value) == ("sparsity 0.01 removes 0.24 of 24 routed experts, which rounds to none; use a sparsity of at "
                              "least 0.02084 (removes 1 expert) or give a keep count instead")
    space = make_space({0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, {0: 1, 1: 1, 2: 1}, sparsity=0.02084)
    assert space.budget == 23
    assert make_space({0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, {0: 1, 1: 1, 2: 1}, sparsity=0.3).budget == 24 - 7   # 7.2 -> 7


@settings(max_examples=60, deadline=None)
@given(spaces(), st.integers(0, 2**32 - 1))
def test_operators_only_produce_feasible_plans(space, seed):
    rng = np.random.default_rng(seed)
    lo, hi, b = space.lower, space.upper, space.budget
    assert space.contains(space.uniform())
    wild = rng.integers(-5, 80, size=space.size)
    assert space.contains(repair_counts(wild, lo, hi, b, rng))
    assert space.contains(random_composition(lo, hi, b, rng))
    for name in PATTERNS:
        assert space.contains(pattern_counts(name, space.num_experts, lo, hi, b, rng))
    x = space.uniform()
    for _ in range(20):
        x = level_switch(x, lo, hi, rng, tmax=3, dmax=int(rng.integers(1, 9)))
        assert space.contains(x)
    w = rng.random(space.size)
    assert space.contains(largest_remainder(w * space.num_experts, b, lo, hi))


@settings(max_examples=40, deadline=None)
@given(spaces(), st.integers(0, 2**32 - 1))
def test_range_repair_and_mutation_stay_in_range(space, seed):
    rng = np.random.default_rng(seed)
    lo_sum, hi_sum = int(space.lower.sum()), int(space.upper.sum())
    rng_b = tuple(sorted(rng.integers(lo_sum, hi_sum + 1, size=2).tolist()))
    x = repair_counts(rng.integers(0, 80, size=space.size), space.lower, space.upper, rng_b, rng)
    for _ in range(10):
        assert rng_b[0] <= x.sum() <= rng_b[1] and (x >= space.lower).all() and (x <= space.upper).all()
        x = level_switch(x, space.lower, space.upper, rng, budget_range=rng_b)


@settings(max_examples=40, deadline=None)
@given(spaces())
def test_the_move_step_doubles_to_a_whole_layer_range_and_resets_on_improvement(space):
    first = default_step(space)
    widest = widest_step(space, first)
    assert widest == max(first, int(np.max(space.upper - space.lower)))
    step, seen = first, [first]
    while step < widest:
        step = next_step(step, first, widest, improved=False)
        seen.append(step)
    assert seen[-1] == widest and all(b == min(2 * a, widest) for a, b in zip(seen, seen[1:]))
    assert next_step(widest, first, widest, improved=False) == widest      # stays at the widest
    assert next_step(widest, first, widest, improved=True) == first        # an improvement looks close again


def test_repair_is_deterministic_given_the_generator():
    lo, hi = np.array([2, 2, 2, 2]), np.array([16, 16, 16, 16])
    a = repair_counts(np.array([30, 1, 9, 9]), lo, hi, 24, np.random.default_rng(7))
    b = repair_counts(np.array([30, 1, 9, 9]), lo, hi, 24, np.random.default_rng(7))
    assert a.tolist() == b.tolist() and a.sum() == 24


def test_largest_remainder_is_proportional():
    x = largest_remainder(np.array([1.0, 1.0, 2.0]), 10, np.zeros(3, int), np.full(3, 10))
    assert x.tolist() == [3, 2, 5]          # shares 2.5, 2.5, 5: tie goes to the lower index
