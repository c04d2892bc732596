"""Optimizer registry: ``get_optimizer(name).run(ctx) -> SearchResult``.

Add an optimizer by writing a module here with a class that has ``name`` and ``run(ctx)``, and one row below.
Modules are imported on first use so ``allocopt --help`` never pays for pymoo/optuna imports.
"""
from __future__ import annotations

from importlib import import_module

from allocopt.errors import AllocoptError
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult

_REGISTRY: dict[str, str] = {
    "ga": "allocopt.search.optimizers.ga:GeneticSearch",
    "evoesap": "allocopt.search.optimizers.evoesap:EvoESAPSearch",
    "cmaes": "allocopt.search.optimizers.optuna_simplex:CmaEsSearch",
    "tpe": "allocopt.search.optimizers.optuna_simplex:TPESearch",
    "nsga2": "allocopt.search.optimizers.nsga2:NSGA2Search",
    "dp": "allocopt.search.optimizers.dp:SensitivityAllocation",
    "random": "allocopt.search.optimizers.random_search:RandomSearch",
    "uniform": "allocopt.search.optimizers.baselines:UniformAllocation",
    "global": "allocopt.search.optimizers.baselines:GlobalRanking",
    "grape": "allocopt.search.optimizers.grape:GrapeAllocation",
}


def available_optimizers() -> list[str]:
    return list(_REGISTRY)


def get_optimizer(name: str) -> Optimizer:
    if name not in _REGISTRY:
        raise AllocoptError(f"unknown optimizer {name!r}; use one of {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(import_module(module), cls)()


__all__ = ["Optimizer", "SearchContext", "SearchResult", "available_optimizers", "get_optimizer"]
