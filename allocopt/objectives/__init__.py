"""ESAP (and KL/NLL) of expert plans against the full model: math, teacher cache, batch engine.

Example::

    from allocopt.objectives import Evaluator
    ev = Evaluator(model, tokens, objective="esap")
    values = ev.evaluate([{0: [0, 2, 3, 5], 1: [1, 4]}, {}])   # {} = unpruned -> ESAP 1.0
"""
from __future__ import annotations

from allocopt.objectives.engine import Evaluator, ObjectiveValue
from allocopt.objectives.objective import OBJECTIVES, Objective, get_objective
from allocopt.objectives.teacher import TeacherCache, build_teacher

__all__ = ["OBJECTIVES", "Evaluator", "Objective", "ObjectiveValue", "TeacherCache", "build_teacher", "get_objective"]
