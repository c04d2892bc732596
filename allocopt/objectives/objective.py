"""Objective registry: a name -> what it needs from the teacher, its direction, and its per-position terms.

Example::

    obj = get_objective("esap")
    obj.direction                      # "maximize"
    lo, hi = obj.terms(logits, chunk)  # per scored position, fp32
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from allocopt.errors import AllocoptError
from allocopt.objectives import divergences as d
from allocopt.objectives.teacher import Mode, TeacherChunk

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Direction
    teacher: Mode                       # what the teacher cache must hold ("sparse" may be upgraded to "exact")
    identity_value: float | None        # the exact value for the unpruned plan, when it is known a priori
    _exact: Callable[[torch.Tensor, TeacherChunk], tuple[torch.Tensor, torch.Tensor]]
    _sparse: Callable[[torch.Tensor, TeacherChunk], tuple[torch.Tensor, torch.Tensor]] | None = None

    def terms(self, logits: torch.Tensor, chunk: TeacherChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position (lo, hi) for the candidate logits at the chunk's scored positions."""
        if chunk.counts is not None and self._sparse is not None:
            return self._sparse(logits, chunk)
        return self._exact(logits, chunk)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


OBJECTIVES: dict[str, Objective] = {
    "esap": Objective("esap", "maximize", "sparse", 1.0,
                      lambda x, c: d.esap_exact(x, c.logp, c.p),
                      lambda x, c: d.esap_sparse(x, c.rows, c.ids.long(), c.probs, c.tail)),
    "kl_pq": Objective("kl_pq", "minimize", "exact", 0.0, lambda x, c: d.kl_pq(x, c.logp)),
    "kl_qp": Objective("kl_qp", "minimize", "exact", 0.0, lambda x, c: d.kl_qp(x, c.logp)),
    "nll": Objective("nll", "minimize", "targets", None, lambda x, c: d.nll(x, c.targets)),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise AllocoptError(f"unknown objective {name!r}; choose one of {', '.join(sorted(OBJECTIVES))}") from None
