"""Calibration: one observed pass over calibration tokens -> per-expert routing statistics.

    stats = observe(model, tokens)      # RoutingStats
    stats.save("stats.safetensors")
"""
from __future__ import annotations

from allocopt.calibration.stats import ACCUMULATORS, FORMAT, RoutingStats

__all__ = ["ACCUMULATORS", "FORMAT", "RoutingStats", "observe"]


def __getattr__(name: str):
    # The observer pulls in the model adapter; statistics-only users (criteria) should not pay for that.
    if name == "observe":
        from allocopt.calibration.observer import observe

        return observe
    raise AttributeError(name)
