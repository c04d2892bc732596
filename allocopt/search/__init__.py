"""The allocation problem and its search: how many experts each MoE layer keeps under one global budget.

    space = make_space(num_experts, top_k, bytes_per_expert, sparsity=0.5)
    result = get_optimizer("ga").run(SearchContext(space, evaluate, seed=0, max_evals=300, population=32, ...))

Operators (repair, level-switch mutation, sampling, selection) are pymoo classes in their own modules so GA,
NSGA-II and the EvoESAP baseline share them; optimizers live in ``allocopt.search.optimizers``.
"""
from allocopt.search.space import AllocationSpace, make_space

__all__ = ["AllocationSpace", "make_space"]
