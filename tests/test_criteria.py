"""Criteria on hand-made statistics: every expected score below is arithmetic written out in the test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allocopt.calibration.stats import RoutingStats
from allocopt.criteria import available_criteria, get_criterion, rank
from allocopt.errors import AllocoptError

BUILTINS = ["ean", "frequency", "man", "msan", "reap", "seer"]


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def hand_stats() -> RoutingStats:
    """Layer 3, four experts, N = 10 tokens with top-2 (20 routed slots):

    expert 0: 8 tokens, sum g = 4.0, sum ||f|| = 16, sum g||f|| = 6.0, sum ||f||^2 = 40, sum g^2||f||^2 = 5.0
    expert 1: 2 tokens, sum g = 1.8, sum ||f|| = 10, sum g||f|| = 9.0, sum ||f||^2 = 52, sum g^2||f||^2 = 40.5
    expert 2: 10 tokens, sum g = 4.2, sum ||f|| = 10, sum g||f|| = 4.0, sum ||f||^2 = 12, sum g^2||f||^2 = 2.0
    expert 3: never routed.
    Layer 5 (two experts) is a tie: identical numbers for both experts.
    """
    s = RoutingStats.empty("model-fp", "data-fp", {3: 4, 5: 2})
    s.num_tokens = 10
    s.count[3] = _t(8, 2, 10, 0)
    s.gate_sum[3] = _t(4.0, 1.8, 4.2, 0)
    s.norm_sum[3] = _t(16, 10, 10, 0)
    s.gate_norm_sum[3] = _t(6.0, 9.0, 4.0, 0)
    s.sq_norm_sum[3] = _t(40, 52, 12, 0)
    s.gate2_sq_norm_sum[3] = _t(5.0, 40.5, 2.0, 0)
    s.max_act[3] = _t(1.5, 3.0, 0.5, 0)
    for name in ("count", "gate_sum", "norm_sum", "gate_norm_sum", "sq_norm_sum", "gate2_sq_norm_sum"):
        getattr(s, name)[5] = _t(10, 10)
    s.similarity[3] = torch.eye(4, dtype=torch.float32)
    return s


EXPECTED_L3 = {
    "frequency": [8, 2, 10, 0],
    "ean": [16, 10, 10, 0],
    "seer": [4.0, 1.8, 4.2, 0],
    "reap": [6.0 / 8, 9.0 / 2, 4.0 / 10, 0],
    "man": [16 / 8, 10 / 2, 10 / 10, 0],
    "msan": [40 / 8, 52 / 2, 12 / 10, 0],
}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_scores_match_hand_arithmetic(name):
    scores = get_criterion(name)(hand_stats())
    np.testing.assert_allclose(scores[3], EXPECTED_L3[name], rtol=1e-12)
    assert scores[3][3] == 0.0  # never routed


def test_rank_order_and_tie_break():
    s = hand_stats()
    assert rank(s, "reap")[3] == [1, 0, 2, 3]       # 4.5 > 0.75 > 0.4 > 0
    assert rank(s, "frequency")[3] == [2, 0, 1, 3]  # 10 > 8 > 2 > 0
    assert rank(s, "ean")[3] == [0, 1, 2, 3]        # 16 > 10 = 10 (lower id first) > 0
    for name in BUILTINS:
        assert rank(s, name)[5] == [0, 1]


def test_unified_specialisations():
    s = hand_stats()
    # b=0, alpha=0, beta=0: F = n/N = [0.8, 0.2, 1.0, 0]; same order as frequency
    np.testing.assert_allclose(get_criterion("unified:b=0,alpha=0,beta=0")(s)[3], [0.8, 0.2, 1.0, 0])
    assert rank(s, "unified:b=0,alpha=0,beta=0") == rank(s, "frequency")
    for spec, same in [("unified:b=1,alpha=1,beta=1", "reap"), ("unified:b=1,alpha=0,beta=2", "msan"),
                       ("unified:b=1,alpha=0,beta=1", "man")]:
        np.testing.assert_allclose(get_criterion(spec)(s)[3], get_criterion(same)(s)[3], rtol=1e-12)
    # b=0, alpha=2, beta=2: F * mean(g^2||f||^2) = sum/N = [0.5, 4.05, 0.2, 0]
    np.testing.assert_allclose(get_criterion("unified:b=0,alpha=2,beta=2")(s)[3], [0.5, 4.05, 0.2, 0])
    # b=0, alpha=1, beta=1 (gated EAN / N): [0.6, 0.9, 0.4, 0]
    np.testing.assert_allclose(get_criterion("unified:b=0,alpha=1,beta=1")(s)[3], [0.6, 0.9, 0.4, 0])
    # b=0.5, alpha=0, beta=1: sqrt(F) * mean||f|| = [sqrt(.8)*2, sqrt(.2)*5, 1*1, 0]
    np.testing.assert_allclose(get_criterion("unified:b=0.5,alpha=0,beta=1")(s)[3],
                               [np.sqrt(0.8) * 2, np.sqrt(0.2) * 5, 1.0, 0])


@pytest.mark.parametrize("spec", ["unified:b=1,alpha=2,beta=1", "unified:b=1,alpha=0,beta=3", "unified:b=2,alpha=0,beta=0",
                                  "unified", "unified:b=1,alpha=1", "unified:b=1,alpha=x,beta=1", "unified:b",
                                  "reap:b=1", "nosuch", "unified:b=1,alpha=0.5,beta=1"])
def test_bad_specs_raise_clear_errors(spec):
    with pytest.raises(AllocoptError):
        get_criterion(spec)


def test_unknown_name_lists_valid_names():
    with pytest.raises(AllocoptError) as err:
        get_criterion("nosuch")
    for name in BUILTINS + ["unified"]:
        assert name in str(err.value)


def test_registry_lists_builtins_and_entry_points():
    from importlib.metadata import entry_points

    names = available_criteria()
    assert set(BUILTINS + ["unified"]) <= set(names)
    assert {ep.name for ep in entry_points(group="allocopt.criteria")} <= set(names)


def test_callable_passes_through_rank():
    s = hand_stats()
    inverse = lambda st: {i: -st.count[i].numpy() for i in st.layers}  # noqa: E731
    assert rank(s, inverse)[3] == [3, 1, 0, 2]


def test_third_party_plugin_is_found_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "plugcrit.py").write_text(
        "import numpy as np\n"
        "def fewest(stats):\n"
        "    return {i: -stats.count[i].numpy() for i in stats.layers}\n")
    dist = tmp_path / "plugcrit-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugcrit\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[allocopt.criteria]\nfewest = plugcrit:fewest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fewest" in available_criteria()
    assert rank(hand_stats(), "fewest")[3] == [3, 1, 0, 2]


def test_non_finite_scores_are_never_ranked():
    """NaN compares false with everything, so a NaN score has no place in an order: rank refuses it."""
    def broken(stats):
        scores = get_criterion("reap")(stats)
        scores[3][2] = np.nan
        return scores

    with pytest.raises(AllocoptError, match=r"scored experts \[2\] of layer 3 as inf/NaN"):
        rank(hand_stats(), broken)
