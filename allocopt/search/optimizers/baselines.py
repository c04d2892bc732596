"""Search-free allocations, each evaluated once so it gets a value: uniform and one global ranking."""
from __future__ import annotations

import numpy as np

from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.space import AllocationSpace


def evaluate_single(ctx: SearchContext, x: np.ndarray) -> SearchResult:
    cache = ctx.cache()
    cache(np.asarray(x)[None])
    return result_from(cache)


class UniformAllocation(Optimizer):
    name = "uniform"
    fixed_allocation = True          # not a search: its plan is reported even where uniform scores higher

    def run(self, ctx: SearchContext) -> SearchResult:
        self.parse(ctx.options)      # it takes none: refuse any
        return evaluate_single(ctx, ctx.space.uniform())


def global_allocation(space: AllocationSpace, ranking: dict[int, list[int]], scores: dict[int, np.ndarray]
                      ) -> np.ndarray:
    """MC-SMoE style: each layer keeps its lower bound, then the globally best remaining experts fill the budget.

    Scores are divided by their layer mean so layers with different scales/widths compete fairly
    (an average expert scores 1 everywhere). Ties: earlier layer, then better within-layer rank.
    """
    x = space.lower.copy()
    candidates = []
    for i, layer in enumerate(space.layers):
        s = np.asarray(scores[layer], dtype=float)
        norm = s / (np.abs(s).mean() or 1.0)
        for pos, expert in enumerate(ranking[layer][x[i]:space.upper[i]]):
            candidates.append((-norm[expert], i, pos))
    for _, i, _ in sorted(candidates)[: space.budget - int(x.sum())]:
        x[i] += 1
    return x


class GlobalRanking(Optimizer):
    name = "global"
    fixed_allocation = True          # not a search: its plan is reported even where uniform scores higher

    def run(self, ctx: SearchContext) -> SearchResult:
        self.parse(ctx.options)      # it takes none: refuse any
        return evaluate_single(ctx, ctx.to_units(global_allocation(ctx.experts, ctx.ranking, ctx.scores)))
