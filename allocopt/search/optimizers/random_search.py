"""Random feasible allocations (uniform first): the floor any search must beat."""
from __future__ import annotations

import numpy as np

from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.problem import MAX_STALLS
from allocopt.search.sampling import random_composition


class RandomSearch(Optimizer):
    name = "random"
    uses_population = True           # its generations (batches) are --population plans

    def run(self, ctx: SearchContext) -> SearchResult:
        self.parse(ctx.options)      # it takes none: refuse any
        space, rng, cache = ctx.space, np.random.default_rng(ctx.seed), ctx.cache()
        cache(space.uniform()[None])
        stalls = 0
        while not cache.exhausted and stalls < MAX_STALLS:
            before = cache.evaluations
            cache(np.array([random_composition(space.lower, space.upper, space.budget, rng)
                            for _ in range(max(1, ctx.population))]))
            stalls = stalls + 1 if cache.evaluations == before else 0
        return result_from(cache)
