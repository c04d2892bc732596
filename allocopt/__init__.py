"""allocopt: per-layer expert allocation search for pruning sparse Mixture-of-Experts LLMs.

Data flows one way: problem file (``allocopt.config``) -> model (``allocopt.models``, run by ``allocopt.runtime``)
-> calibration statistics (``allocopt.calibration``) -> criterion ranking (``allocopt.criteria``) -> objective
(``allocopt.objectives``) -> optimizer (``allocopt.search``) -> plan (``allocopt.plan``) -> export
(``allocopt.export``) / evaluation -> plots; ``allocopt.pipeline`` runs the stages for every command.
"""
from __future__ import annotations

from allocopt.errors import AllocoptError
from allocopt.plan import Plan

__version__ = "0.1.0"
__all__ = ["AllocoptError", "Plan", "load_pruned", "__version__"]


def load_pruned(path):
    """Load a pruned checkpoint written by ``allocopt prune`` with plain transformers classes."""
    from allocopt.models.pruned import load_pruned as _load

    return _load(path)
