"""Criterion registry: names (and plugins from the entry-point group ``allocopt.criteria``) -> score functions.

A criterion is a function ``RoutingStats -> {layer: np.ndarray [E]}`` where higher means keep. A factory
(a callable with ``is_factory = True``) takes keyword arguments and returns a criterion; it is addressed as
``name:key=value,...``.

    crit = get_criterion("unified:b=1,alpha=0,beta=2")   # == msan
    order = rank(stats, "reap")                            # {layer: expert ids, best first}
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Mapping

import numpy as np

from allocopt.calibration.stats import RoutingStats
from allocopt.criteria import builtin
from allocopt.errors import AllocoptError

GROUP = "allocopt.criteria"
Criterion = Callable[[RoutingStats], dict[int, np.ndarray]]

# The built-ins are always available, even from a source tree that was never pip-installed.
_BUILTINS: dict[str, Callable] = {f.__name__: f for f in (builtin.frequency, builtin.ean, builtin.seer, builtin.reap,
                                                            builtin.man, builtin.msan, builtin.unified)}


def _registry() -> dict[str, Callable | EntryPoint]:
    found = dict(_BUILTINS)
    for ep in entry_points(group=GROUP):
        if ep.name not in found:
            found[ep.name] = ep  # loaded lazily, only when asked for
    return found


def available_criteria() -> list[str]:
    """Names accepted by :func:`get_criterion` (a factory such as ``unified`` also needs ``:key=value,...``)."""
    return sorted(_registry())


def _parse_value(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError as exc:
        raise AllocoptError(f"criterion parameter value {text!r} is not a number; write e.g. unified:b=1,alpha=0,beta=2") from exc
    return int(value) if value.is_integer() else value


def _parse(spec: str) -> tuple[str, dict[str, float | int]]:
    name, _, args = spec.strip().partition(":")
    params: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise AllocoptError(f"criterion parameter {part!r} in {spec!r} is not key=value; write e.g. unified:b=1,alpha=0,beta=2")
        params[key.strip()] = _parse_value(value.strip())
    return name.strip(), params


def get_criterion(spec: str | Criterion) -> Criterion:
    """``"reap"`` or ``"unified:b=1,alpha=0,beta=2"`` -> criterion function; a callable passes through."""
    if callable(spec):
        return spec
    name, params = _parse(spec)
    registry = _registry()
    if name not in registry:
        raise AllocoptError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(registry))}")
    obj = registry[name]
    if isinstance(obj, EntryPoint):
        obj = obj.load()
    if getattr(obj, "is_factory", False):
        try:
            return obj(**params)
        except TypeError as exc:
            raise AllocoptError(f"criterion {name!r} rejected parameters {params} ({exc}); e.g. write unified:b=1,alpha=0,beta=2") from exc
    if params:
        raise AllocoptError(f"criterion {name!r} takes no parameters; write just {name!r}")
    return obj


def rank(stats: RoutingStats, criterion: str | Criterion, groups: Mapping[int, int] | None = None) -> dict[int, list[int]]:
    """Expert ids per layer, best (highest score) first: :func:`ranking_from_scores` of the criterion's scores."""
    fn = get_criterion(criterion)
    name = criterion if isinstance(criterion, str) else getattr(fn, "__name__", "criterion")
    return ranking_from_scores(fn(stats), stats.layers, groups, name)


def ranking_from_scores(scores: Mapping[int, np.ndarray], layers, groups: Mapping[int, int] | None = None,
                        name: str = "criterion") -> dict[int, list[int]]:
    """Expert ids per layer of ``layers``, best (highest score) first; ties go to the lower id so the order is
    deterministic. ``scores[layer]`` is a criterion's [E] scores (higher = keep), computed once by the caller.

    ``groups[layer]`` > 1 (group-limited routing) ranks within groups instead: the ranking takes the best expert of
    every group, then the second best of every group, and so on, so keeping any multiple of the group count keeps
    the best experts of each group in equal numbers (what the pruned router needs).
    A non-finite score is refused: NaN compares false with everything, so it would land anywhere in the order.
    """
    out = {}
    for layer in layers:
        s = np.asarray(scores[layer], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(s))
        if bad.size:
            raise AllocoptError(f"criterion {name!r} scored experts {bad.tolist()} of layer {layer} as inf/NaN, which has no "
                                "rank; fix the criterion or the statistics (re-run `allocopt observe` in bfloat16 or float32)")
        # lexsort sorts by the last key first: descending score, then ascending id
        order = [int(i) for i in np.lexsort((np.arange(s.size), -s))]
        out[layer] = balance_groups(order, (groups or {}).get(layer, 1))
    return out


def balance_groups(order: list[int], groups: int) -> list[int]:
    """Interleave a best-first ranking of E experts in ``groups`` contiguous groups of E/groups: level by level,
    each group's next-best expert, groups in the order of that expert's overall rank."""
    if groups <= 1:
        return list(order)
    size = len(order) // groups
    position = {e: r for r, e in enumerate(order)}
    per_group = [sorted((e for e in order if e // size == g), key=position.__getitem__) for g in range(groups)]
    out = []
    for level in range(size):
        out.extend(sorted((members[level] for members in per_group), key=position.__getitem__))
    return out


__all__ = ["available_criteria", "balance_groups", "get_criterion", "rank", "ranking_from_scores", "Criterion", "GROUP"]
