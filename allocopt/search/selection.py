"""EvoESAP's parent selection: every parent is drawn uniformly from the m best individuals (the elite pool)."""
from __future__ import annotations

import numpy as np
from pymoo.core.selection import Selection


class TopMRandomSelection(Selection):
    def __init__(self, m: int):
        super().__init__()
        self.m = m

    def _do(self, problem, pop, n_select, n_parents, random_state=None, **kwargs):
        top = np.argsort(pop.get("F")[:, 0], kind="stable")[: self.m]
        return random_state.choice(top, size=(n_select, n_parents))
