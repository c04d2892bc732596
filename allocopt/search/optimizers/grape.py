"""GRAPE-style allocation (related-work.md §4.1): greedily prune the most redundant layer, with an entropy guard.

Layer redundancy R_l = sum of pairwise similarities among its kept experts. Each step removes one expert of
the most similar pair in the most redundant eligible layer. If that removal would lower the entropy of the
kept counts below (1 - gamma) * H_0 (``--option gamma``, ``defaults.GRAPE_GAMMA``), the layer is frozen instead;
when every layer is frozen the freeze set is cleared and one removal is forced (restart), so the loop always
reaches the budget.
This keeps very redundant layers from being hollowed out. Only counts are returned: which experts are kept
is decided afterwards by the criterion ranking, like for every other optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult
from allocopt.search.optimizers.baselines import evaluate_single
from allocopt.search.optimizers.options import option
from allocopt.search.space import AllocationSpace


def _entropy(n: np.ndarray) -> float:
    p = n[n > 0] / n.sum()
    return float(-(p * np.log(p)).sum())


def grape_allocation(space: AllocationSpace, similarity: dict[int, np.ndarray],
                     ranking: dict[int, list[int]] | None = None, gamma: float = defaults.GRAPE_GAMMA) -> np.ndarray:
    sims, alive = [], []
    for i, layer in enumerate(space.layers):
        d = np.array(similarity[layer], dtype=float)
        np.fill_diagonal(d, -np.inf)
        sims.append(d)
        alive.append(np.ones(space.num_experts[i], dtype=bool))
    order = [{e: r for r, e in enumerate(ranking[l])} if ranking else {} for l in space.layers]

    def redundancy(i: int) -> float:
        d = sims[i][np.ix_(alive[i], alive[i])]
        return float(d[np.isfinite(d)].sum())

    def remove_one(i: int) -> None:
        d = np.where(np.outer(alive[i], alive[i]), sims[i], -np.inf)
        a, b = np.unravel_index(int(np.argmax(d)), d.shape)
        # drop the worse-ranked expert of the most similar pair (by index when there is no ranking)
        drop = max((a, b), key=lambda e: order[i].get(int(e), int(e)))
        alive[i][drop] = False

    n = space.num_experts.astype(np.int64).copy()
    for i in range(space.size):                      # layers above their upper bound lose experts first
        while n[i] > space.upper[i]:
            remove_one(i)
            n[i] -= 1
    threshold = (1.0 - gamma) * _entropy(n)
    red = np.array([redundancy(i) for i in range(space.size)])
    frozen = np.zeros(space.size, dtype=bool)
    while n.sum() > space.budget:
        open_ = n > space.lower
        eligible = open_ & ~frozen
        if not eligible.any():                       # restart: clear the freeze set, force one removal
            frozen[:] = False
            eligible = open_
            i = int(np.argmax(np.where(eligible, red, -np.inf)))
        else:
            i = int(np.argmax(np.where(eligible, red, -np.inf)))
            after = n.copy()
            after[i] -= 1
            if _entropy(after) < min(threshold, _entropy(n)):
                frozen[i] = True                     # this removal would unbalance the allocation too far
                continue
        remove_one(i)
        n[i] -= 1
        red[i] = redundancy(i)
    return n


class GrapeAllocation(Optimizer):
    name = "grape"
    fixed_allocation = True          # not a search: its plan is reported even where uniform scores higher

    @dataclass(frozen=True)
    class Options:
        gamma: float = option(defaults.GRAPE_GAMMA, at_least=0.0, at_most=1.0)

    def run(self, ctx: SearchContext) -> SearchResult:
        opts = self.parse(ctx.options)
        similarity = getattr(ctx.stats, "similarity", None)
        if not similarity:
            raise AllocoptError("grape needs per-layer expert similarity from calibration; run calibration "
                                "with a stats file that has similarity matrices or pick another optimizer")
        sim = {l: np.asarray(similarity[l].numpy() if hasattr(similarity[l], "numpy") else similarity[l])
               for l in ctx.space.layers}
        x = grape_allocation(ctx.experts, sim, ctx.ranking, opts.gamma)
        return evaluate_single(ctx, ctx.to_units(x))
