"""The allocation space: one integer per MoE layer (experts kept), per-layer bounds and one global budget.

Some routers only route exactly when a layer keeps a multiple of some step: group-limited routing (DeepSeek-V3
``n_group``) needs the same number of experts in every group, so a layer keeps a multiple of its group count.
The space then counts in *units* of ``unit`` experts; :meth:`AllocationSpace.lattice` is that space with every
count divided by the unit, which is what optimizers search, so no operator (repair, mutation, sampling) needs to
know about groups. :meth:`expand` maps a lattice point back to expert counts.

Some serving kernels accept only a list of expert counts (``--allowed-counts``: vLLM's fused DeepSeek-V4 router
takes some counts and crashes on others). Such a list is not a lattice, so it enters the search as a *decoder*
(the genotype-to-phenotype map of constrained evolutionary search): optimizers search the integer space as before
and :meth:`expand` sends every point to the nearest allowed plan on the same budget (:meth:`snap`), so every plan
evaluated, recorded and returned keeps allowed counts; the sensitivity DP probes and solves on the allowed counts
themselves (:meth:`levels`).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.plan import check_allowed_counts
from allocopt.search.rounding import dp_allocate, largest_remainder

_log = logging.getLogger("allocopt")
_NOTED: set[tuple] = set()


@dataclass(frozen=True)
class Budget:
    """The global budget of a search: a ``sparsity`` (fraction of routed experts removed, in (0, 1)) or a ``keep``
    count (total routed experts kept, >= 1), exactly one of them. Constructing one is the only check of these
    values (``RunConfig`` and :func:`make_space` both build one); the bounds of a particular model are checked by
    :func:`make_space`."""

    sparsity: float | None = None
    keep: int | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.keep is not None:
            raise AllocoptError(f"both sparsity and keep are set (sparsity {self.sparsity:g}, keep {self.keep}); give only "
                                "one of them")
        if self.sparsity is None and self.keep is None:
            raise AllocoptError("neither sparsity nor keep is set; give one of them (e.g. sparsity = 0.5)")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise AllocoptError(f"sparsity must lie strictly between 0 and 1, got {self.sparsity:g}; e.g. 0.5 removes "
                                "half the routed experts")
        if self.keep is not None and self.keep < 1:
            raise AllocoptError(f"keep must be a positive number of experts, got {self.keep}; raise it")

    def kept(self, total: int, unit: int = 1, at_most: bool = False) -> int:
        """Experts kept out of ``total`` routed experts, a multiple of ``unit`` (rounded half up; down ``at_most``)."""
        keep = total - experts_removed(self.sparsity, total, unit) if self.sparsity is not None else self.keep
        return unit * int(math.floor(int(keep) / unit + (0.0 if at_most else 0.5)))


@dataclass(frozen=True)
class AllocationSpace:
    """Feasible set {x : lower <= x <= upper, sum(x) == budget}; x[l] = experts kept in MoE layer layers[l]."""

    layers: tuple[int, ...]
    num_experts: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    budget: int
    bytes_per_expert: np.ndarray
    unit: int = 1                 # every count is a multiple of this many experts (group-limited routing)
    allowed: tuple[int, ...] = ()  # the only counts a layer may keep (``--allowed-counts``), in this space's units

    @property
    def size(self) -> int:
        return len(self.layers)

    def lattice(self) -> "AllocationSpace":
        """The same space counted in units of ``unit`` experts (itself when ``unit`` is 1): what optimizers search."""
        if self.unit == 1:
            return self
        u = self.unit
        return AllocationSpace(self.layers, self.num_experts // u, self.lower // u, self.upper // u, self.budget // u,
                               self.bytes_per_expert * u, allowed=tuple(a // u for a in self.allowed))

    def expand(self, x) -> np.ndarray:
        """Expert counts of a lattice point (rows of ``x`` in units) -> the same shape in experts, sent to the
        nearest allowed plan (:meth:`snap`) when only some counts are allowed."""
        return self.snap(np.asarray(x, dtype=np.int64) * self.unit)

    def levels(self, i: int) -> np.ndarray:
        """The counts layer ``i`` may keep, ascending: every count within its bounds, or the allowed ones there."""
        return self._levels[i]

    @functools.cached_property
    def _levels(self) -> tuple[np.ndarray, ...]:
        spans = [np.arange(lo, hi + 1, dtype=np.int64) for lo, hi in zip(self.lower, self.upper)]
        return tuple(span if not self.allowed else span[np.isin(span, self.allowed)] for span in spans)

    def snap(self, x) -> np.ndarray:
        """Rows of ``x`` ([L] or [n, L], in this space's units) -> the nearest plans (least total |change|) whose
        every count is allowed: on the budget exactly where a row sums to it (``dp_allocate`` with cost |change| on
        the allowed counts), else each count to its nearest allowed one (a probe off the budget stays off it).
        Identity without ``allowed``."""
        x = np.asarray(x, dtype=np.int64)
        if not self.allowed:
            return x
        rows = np.atleast_2d(x)
        out = np.array([self._snap_row(r) for r in rows], dtype=np.int64).reshape(rows.shape)
        return out if x.ndim == 2 else out[0]

    def _snap_row(self, x: np.ndarray) -> np.ndarray:
        if int(x.sum()) != self.budget:
            return np.array([lv[np.argmin(np.abs(lv - c))] for lv, c in zip(self._levels, x)], dtype=np.int64)
        costs = []
        for lo, hi, lv, c in zip(self.lower, self.upper, self._levels, x):
            cost = np.full(int(hi - lo) + 1, np.inf)
            cost[lv - lo] = np.abs(lv - int(c))
            costs.append(cost)
        return dp_allocate(costs, self.lower, self.upper, self.budget)

    def project(self, x) -> np.ndarray:
        """The lattice point (in units) nearest to expert counts ``x`` on the budget (largest remainder)."""
        lat = self.lattice()
        return largest_remainder(np.asarray(x, dtype=float) / self.unit, lat.budget, lat.lower, lat.upper)

    def uniform(self) -> np.ndarray:
        """Same kept fraction in every layer (largest remainder when not divisible), clipped to the bounds; on the
        lattice when ``unit`` > 1."""
        if self.unit > 1:
            return self.expand(self.lattice().uniform())
        return self.snap(largest_remainder(self.num_experts, self.budget, self.lower, self.upper))

    def contains(self, x) -> bool:
        x = np.asarray(x)
        return (x.shape == (self.size,) and bool(np.all(x == np.round(x))) and int(x.sum()) == self.budget
                and bool(np.all(x >= self.lower)) and bool(np.all(x <= self.upper)) and bool(np.all(x % self.unit == 0))
                and (not self.allowed or bool(np.all(np.isin(x, self.allowed)))))

    def memory_bytes(self, x) -> np.ndarray:
        """Bytes of the kept routed experts, per row of ``x`` ([n, L] -> [n], or [L] -> scalar array)."""
        return np.asarray(x, dtype=np.int64) @ self.bytes_per_expert

    def as_dict(self, x) -> dict[int, int]:
        return {layer: int(k) for layer, k in zip(self.layers, np.asarray(x))}

    # ---- what a study records of a plan (search.study.StudyRecorder) ----
    def params(self) -> list[tuple[str, int, int]]:
        """(trial param name, low, high) of each coordinate of a plan: one count per MoE layer."""
        return [(param_name(layer), int(lo), int(hi)) for layer, lo, hi in zip(self.layers, self.lower, self.upper)]

    def constraints(self, x) -> list[float]:
        """Optuna constraint values of plan ``x`` (feasible when all are <= 0): on the budget exactly."""
        excess = float(int(np.sum(x)) - int(self.budget))
        return [excess, -excess]


def param_name(layer: int) -> str:
    """The trial param holding a plan's count of MoE layer ``layer`` (what optuna-dashboard plots)."""
    return f"layer_{layer:03d}"


def check_density(min_density: float, max_density: float) -> None:
    """The per-layer density bounds a run may ask for (the one check; RunConfig and make_space call it)."""
    if not 0.0 <= min_density <= max_density <= 1.0:
        raise AllocoptError(f"density bounds must satisfy 0 <= min_density ({min_density}) <= max_density "
                            f"({max_density}) <= 1; fix the bounds")


def make_space(num_experts: Mapping[int, int], top_k: Mapping[int, int], bytes_per_expert: Mapping[int, int],
               sparsity: float | None = None, keep: int | None = None,
               min_density: float = 0.0, max_density: float = 1.0, min_kept: Mapping[int, int] | None = None,
               unit: int = 1, allowed_counts: tuple[int, ...] | list[int] | None = None,
               at_most: bool = False) -> AllocationSpace:
    """Build the space for a global ``sparsity`` (fraction of routed experts removed) or a total ``keep``.

    Every layer keeps at least its top-k and ``min_kept[layer]`` (what its router needs to route exactly, e.g.
    two experts per group for DeepSeek-V3's group score; a hash-routed layer needs all of them) and
    ``ceil(min_density * E)``, at most ``floor(max_density * E)``; with ``unit`` > 1 every count is a multiple of
    ``unit`` and the total is rounded to the nearest multiple. With ``allowed_counts`` a layer keeps only those
    counts (those that are multiples of ``unit``) and the total is the reachable sum nearest the requested one (a
    note says so when they differ). ``at_most``: the total never exceeds the one asked for (rounded down, the
    largest reachable sum below it): a budget in bytes. Impossible requests raise AllocoptError before any model work.
    """
    budget = Budget(sparsity, keep)
    check_density(min_density, max_density)
    layers = tuple(sorted(num_experts))
    if not layers:
        raise AllocoptError("the model has no MoE layers to allocate; use a Mixture-of-Experts model")
    e = np.array([int(num_experts[l]) for l in layers], dtype=np.int64)
    k = np.array([int(top_k[l]) for l in layers], dtype=np.int64)
    floor = np.array([int((min_kept or {}).get(l, 0)) for l in layers], dtype=np.int64)
    lower = np.maximum(np.maximum(k, floor), np.ceil(min_density * e - 1e-9).astype(np.int64))
    upper = np.minimum(e, np.floor(max_density * e + 1e-9).astype(np.int64))
    lower, upper, free_lower, free_upper = -(-lower // unit) * unit, upper // unit * unit, lower, upper
    bad = [layers[i] for i in np.flatnonzero(lower > upper)]
    if bad and not np.any(free_lower > free_upper):                 # only the step leaves a layer nothing to keep
        i = layers.index(bad[0])
        fits = [m for m in range(int(free_upper.min()), 0, -1)
                if np.all(free_upper // m * m >= free_lower)] or [1]   # the largest step every layer has a count of
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        fix = f"use a --count-multiple that divides {fits[0]}" if fits[0] > 1 else "drop --count-multiple"
        raise AllocoptError(f"{_step(unit)} leaves no count between {free_lower[i]} and {free_upper[i]} experts (top-k, "
                            f"what the router needs, density bounds) in layer {bad[0]}{more}; {fix}")
    if bad:
        raise AllocoptError(f"layers {bad} cannot satisfy top-k/min_density {min_density} <= kept <= "
                            f"max_density {max_density}; widen the density bounds")
    total = int(e.sum())
    keep = budget.kept(total, unit, at_most)
    lo_sum, hi_sum = int(lower.sum()), int(upper.sum())
    if not lo_sum <= keep <= hi_sum:
        asked = f"sparsity {budget.sparsity:g} ({keep} experts)" if budget.sparsity is not None else f"keeping {budget.keep} experts"
        if unit > 1 and int(free_lower.sum()) <= budget.kept(total, 1, at_most) <= int(free_upper.sum()):
            kept = (f"every layer keeps {lower[0]} experts ({lo_sum} in all)" if lo_sum == hi_sum and np.all(lower == lower[0])
                    else f"the layers keep {lo_sum}..{hi_sum} experts in all")
            more = keep < lo_sum
            fix = (("the sparsity" if more else "raise the sparsity") if budget.sparsity is not None
                   else "keep more experts (a larger budget)" if more else "keep fewer experts (a smaller budget)")
            raise AllocoptError(f"with {_step(unit)} {kept}, so {asked} cannot be met; lower --count-multiple or {fix}")
        raise AllocoptError(
            f"keeping {keep} of {total} experts is impossible: the per-layer bounds allow "
            f"{lo_sum}..{hi_sum} (top-k, what each router needs and density bounds); choose a sparsity/keep in that range "
            f"or relax min_density/max_density")
    bpe = np.array([int(bytes_per_expert[l]) for l in layers], dtype=np.int64)
    allowed: tuple[int, ...] = ()
    if allowed_counts is not None:
        allowed, lower, upper, keep = _allowed(allowed_counts, layers, lower, upper, keep, unit, at_most)
        if keep == total:
            raise AllocoptError(f"with --allowed-counts {','.join(map(str, allowed))} the total nearest the budget keeps all "
                                f"{total} routed experts, pruning nothing; allow smaller counts or prune more")
    return AllocationSpace(layers, e, lower, upper, keep, bpe, unit, allowed)


def _allowed(counts, layers: tuple[int, ...], lower: np.ndarray, upper: np.ndarray, keep: int, unit: int,
             at_most: bool = False):
    """``--allowed-counts``: the counts kept, the bounds tightened to each layer's lowest and highest allowed count,
    and the reachable total nearest ``keep`` (ties to fewer experts; ``at_most``: the largest not above it)."""
    counts = check_allowed_counts(counts)
    allowed = tuple(c for c in counts if c % unit == 0)
    levels = [[a for a in allowed if lo <= a <= hi] for lo, hi in zip(lower, upper)]
    for layer, lo, hi, lv in zip(layers, lower, upper, levels):
        if not lv:
            within = f" that is a multiple of {unit} (--count-multiple or routing groups)" if unit > 1 else ""
            raise AllocoptError(f"layer {layer} keeps {lo}..{hi} experts (top-k, what its router needs, density bounds) "
                                f"but no allowed count{within} lies there (--allowed-counts {','.join(map(str, counts))}); "
                                "add one in that range")
    reach = 1                                         # bit t set: t experts reachable over the layers so far
    for lv in levels:
        reach = functools.reduce(lambda acc, v: acc | (reach << v), lv, 0)
    sums = [t for t in range(reach.bit_length()) if reach >> t & 1]
    below = [t for t in sums if t <= keep]
    if at_most and not below:
        raise AllocoptError(f"no plan of --allowed-counts {','.join(map(str, allowed))} keeps {keep} experts or fewer; "
                            f"the smallest keeps {sums[0]}: allow smaller counts or raise the budget")
    total = max(below) if at_most else min(sums, key=lambda t: (abs(t - keep), t))
    if total != keep and (keep, allowed, total) not in _NOTED:
        _NOTED.add((keep, allowed, total))          # once per process: the space is built before and after loading
        _log.info("keeping %d experts is not a sum of allowed counts (%s); the budget is %d, the nearest that is",
                  keep, ", ".join(map(str, allowed)), total)
    lower = np.array([lv[0] for lv in levels], dtype=np.int64)
    upper = np.array([lv[-1] for lv in levels], dtype=np.int64)
    return allowed, lower, upper, total


def _step(unit: int) -> str:
    """How a message names the step every count is a multiple of: ``--count-multiple`` and routing groups' lcm."""
    return f"a count multiple of {unit} (--count-multiple or routing groups)"


def experts_removed(sparsity: float, total: int, unit: int = 1) -> int:
    """Experts a global ``sparsity`` removes out of ``total``, rounded half up to a multiple of ``unit`` (group-limited
    routing removes whole units); refused when that is none, since such a run would search nothing and record
    sparsity 0 while the user asked for more."""
    removed = unit * int(math.floor(sparsity * total / unit + 0.5))
    if removed == 0:
        exact = 0.5 * unit / total                        # the least sparsity that rounds to one unit ...
        scale = 10 ** (3 - math.floor(math.log10(exact)))
        least = math.ceil(exact * scale) / scale          # ... rounded up to 4 significant digits
        what = "1 expert" if unit == 1 else f"{unit} experts, one step of --count-multiple or routing groups"
        raise AllocoptError(f"sparsity {sparsity:g} removes {sparsity * total:.3g} of {total} routed experts, which rounds to "
                            f"none; use a sparsity of at least {least:g} (removes {what}) or give a keep count instead")
    return removed
