"""Optimizer registry: names (and plugins from the entry-point group ``allocopt.optimizers``) -> Optimizer classes.

    opt = get_optimizer("ga")                   # an instance of allocopt.search.optimizers.ga.GeneticSearch
    opt.check(space, 300, {"elites": "6"})      # options refused in one line before anything runs
    result = opt.run(ctx)                       # SearchContext -> SearchResult

An optimizer is an ``Optimizer`` subclass (``base.py``) with typed ``Options`` (``options.py``). A package adds one
by listing ``name = "module:Class"`` under ``[project.entry-points."allocopt.optimizers"]`` in its pyproject.toml.
Modules are imported on first use, so ``allocopt --help`` never pays for pymoo/optuna imports.
"""
from __future__ import annotations

import inspect
from importlib import import_module
from importlib.metadata import entry_points

from allocopt.errors import AllocoptError
from allocopt.search.optimizers.base import Optimizer, SearchContext, SearchResult, result_from
from allocopt.search.optimizers.options import NoOptions, option, parse_options

GROUP = "allocopt.optimizers"
_PACKAGE = "allocopt"

# The built-ins, in the order they are listed. pyproject.toml lists them in GROUP as well, but this table is what
# counts, so a source tree never pip-installed, or an editable install whose metadata is stale, still has them.
_BUILTINS: dict[str, str] = {
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


def _registry() -> dict[str, list[tuple[str, str]]]:
    """name -> the (``module:Class``, distribution) pairs registering it: the built-ins, then every other
    distribution's entry points (read afresh each call: a few milliseconds, and the current ``sys.path``)."""
    found = {name: [(target, _PACKAGE)] for name, target in _BUILTINS.items()}
    plugins = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "an unnamed distribution"
        if dist != _PACKAGE:
            plugins.setdefault(ep.name, []).append((ep.value, dist))
    for name in sorted(plugins):
        sources = found.setdefault(name, [])
        sources.extend(s for s in plugins[name] if s[0] not in {target for target, _ in sources})
    return found


def available_optimizers() -> list[str]:
    """Names accepted by :func:`get_optimizer`: the built-ins, then plugins by name."""
    return list(_registry())


def get_optimizer(name: str) -> Optimizer:
    """A new instance of the optimizer registered as ``name``; one-line AllocoptError when there is none, when two
    distributions register it, or when what it names is not an Optimizer subclass called ``name``."""
    registry = _registry()
    if name not in registry:
        raise AllocoptError(f"unknown optimizer {name!r}; use one of {', '.join(registry)}")
    sources = registry[name]
    if len(sources) > 1:
        listed = " and ".join(f"{target} ({dist})" for target, dist in sources)
        raise AllocoptError(f"optimizer {name!r} is registered twice, as {listed}; uninstall one or rename its "
                            f"entry point in group {GROUP}")
    target, dist = sources[0]
    cls = _load(name, target, dist)
    where = f"optimizer {name!r} ({target}, from {dist})"
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise AllocoptError(f"{where} is not an Optimizer subclass; derive it from "
                            "allocopt.search.optimizers.Optimizer")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise AllocoptError(f"{where} does not define {missing}; add it to the class")
    if cls.name != name:
        raise AllocoptError(f"{where} is called {cls.name!r} on its class; make the entry point's name and "
                            f"{cls.__name__}.name the same")
    return cls()


def _load(name: str, target: str, dist: str) -> object:
    module, _, attr = target.partition(":")
    if dist == _PACKAGE:                         # a built-in: a failure is allocopt's bug, let it show
        return getattr(import_module(module), attr)
    try:
        obj = import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:                     # a plugin's import error must not read as allocopt's
        raise AllocoptError(f"optimizer {name!r} ({target}, from {dist}) failed to load ({type(exc).__name__}: "
                            f"{exc}); fix or uninstall {dist}") from exc
    return obj


__all__ = ["GROUP", "NoOptions", "Optimizer", "SearchContext", "SearchResult", "available_optimizers",
           "get_optimizer", "option", "parse_options", "result_from"]
