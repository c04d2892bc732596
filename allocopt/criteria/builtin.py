"""Built-in expert-ranking criteria: pure functions ``RoutingStats -> {layer: scores [E]}`` (higher = keep).

All of them are members of the unified family of related-work §3,

    S_j(b, alpha, beta) = F_j^(1-b) * E_{x in X_j}[ g_j(x)^alpha * ||f_j(x)||^beta ],   F_j = n_j / N,

where X_j are the tokens routed to expert j, g the gate weight the model applied and f the expert's output.
Each is a ratio of accumulators in RoutingStats, so no criterion needs another forward pass. Experts that
were never routed score 0.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from allocopt.calibration.stats import RoutingStats
from allocopt.errors import AllocoptError

Scores = dict[int, np.ndarray]
Criterion = Callable[[RoutingStats], Scores]

# (alpha, beta) -> accumulator holding sum over routed tokens of g^alpha * ||f||^beta
_SUMS: dict[tuple[int, int], str] = {
    (0, 0): "count",
    (1, 0): "gate_sum",
    (0, 1): "norm_sum",
    (1, 1): "gate_norm_sum",
    (0, 2): "sq_norm_sum",
    (2, 2): "gate2_sq_norm_sum",
}


def _total(stats: RoutingStats, name: str) -> Scores:
    return {layer: stats.accumulator(name)[layer].double().numpy().copy() for layer in stats.layers}


def _routed_mean(stats: RoutingStats, name: str) -> Scores:
    """Sum / n over routed tokens; 0 for never-routed experts."""
    out = {}
    for layer in stats.layers:
        n = stats.count[layer].double().numpy()
        s = stats.accumulator(name)[layer].double().numpy()
        out[layer] = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    return out


def frequency(stats: RoutingStats) -> Scores:
    """n_j: how many calibration tokens route to j."""
    return _total(stats, "count")


def ean(stats: RoutingStats) -> Scores:
    """EAN: sum of output norms over routed tokens."""
    return _total(stats, "norm_sum")


def seer(stats: RoutingStats) -> Scores:
    """SEER soft count: sum of applied gate weights over routed tokens."""
    return _total(stats, "gate_sum")


def reap(stats: RoutingStats) -> Scores:
    """REAP: mean over routed tokens of g * ||f||."""
    return _routed_mean(stats, "gate_norm_sum")


def man(stats: RoutingStats) -> Scores:
    """MAN: mean output norm over routed tokens (task-agnostic choice of related-work §3.2)."""
    return _routed_mean(stats, "norm_sum")


def msan(stats: RoutingStats) -> Scores:
    """MSAN: mean squared output norm over routed tokens."""
    return _routed_mean(stats, "sq_norm_sum")


def unified(b: float, alpha: int, beta: int) -> Criterion:
    """Factory for S(b, alpha, beta); (alpha, beta) must be one of the accumulated combinations."""
    key = (int(alpha), int(beta))
    if key != (alpha, beta) or key not in _SUMS:
        combos = ", ".join(f"alpha={a},beta={c}" for a, c in _SUMS)
        raise AllocoptError(f"unified criterion has no statistic for alpha={alpha},beta={beta}; use one of {combos}")
    if not 0.0 <= float(b) <= 1.0:
        raise AllocoptError(f"unified criterion needs 0 <= b <= 1 (got b={b}); use b=0 (sum) or b=1 (routed mean)")
    name = _SUMS[key]

    def criterion(stats: RoutingStats) -> Scores:
        if stats.num_tokens <= 0:
            raise AllocoptError("statistics hold no tokens; re-run `allocopt observe` on non-empty calibration data")
        means = _routed_mean(stats, name)
        # F^(1-b); F = 0 only where the mean is already 0, so 0^0 = 1 never turns a 0 score positive.
        return {layer: (stats.count[layer].double().numpy() / stats.num_tokens) ** (1.0 - float(b)) * m
                for layer, m in means.items()}

    criterion.__name__ = f"unified:b={b},alpha={alpha},beta={beta}"
    return criterion


unified.is_factory = True  # the registry calls it with the parsed keyword arguments
