"""ESAP (and KL/NLL) of expert plans against the full model: math, teacher cache, batch engine.

Example::

    from allocopt.objectives import Evaluator
    ev = Evaluator(model, tokens, objective="esap")
    values = ev.evaluate([{0: [0, 2, 3, 5], 1: [1, 4]}, {}])   # {} = unpruned -> ESAP 1.0

The names below are imported on first use (PEP 562), so the torch-free parts (``rowstats``, which the search's
racing reads) import without torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Evaluator": "allocopt.objectives.engine", "ObjectiveValue": "allocopt.objectives.engine",
    "OBJECTIVES": "allocopt.objectives.objective", "Objective": "allocopt.objectives.objective",
    "get_objective": "allocopt.objectives.objective",
    "TeacherCache": "allocopt.objectives.teacher", "build_teacher": "allocopt.objectives.teacher",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
