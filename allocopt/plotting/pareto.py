"""ESAP vs expert memory: every evaluated plan, the non-dominated front and its hypervolume.

The hypervolume is measured on the minimisation pair ``[-ESAP, expert memory in GB]`` against the FIXED
reference point ``[0, total routed-expert memory of the unpruned model]``: ESAP 0 is the worst possible score
and keeping every expert is the most memory a plan can use, so hypervolumes of runs on the same model are
comparable no matter which points each run happened to evaluate.

Example::

    paths = plot_pareto("studies/my-nsga2-run")      # -> {"png": ..., "csv": ..., "json": ...}
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.io import read_json
from allocopt.plotting.output import counts_field, default_out_dir, new_figure, save_csv, save_figure, save_json
from allocopt.plotting.sources import Evaluation, Source, resolve_sources

GB = 1e9
_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "bytes"))   # axis unit: the largest that keeps values >= 1


@dataclass(frozen=True)
class ParetoData:
    name: str
    points: list[Evaluation]          # every evaluated plan with a finite ESAP and memory
    on_front: np.ndarray              # [n] bool, non-dominated (max ESAP, min memory)
    uniform: np.ndarray               # [n] bool
    ref_memory_bytes: float
    hypervolume: float
    source: str                       # "study" or "front.json"
    memory: str = "routed-expert memory kept"    # what the memory axis counts ("export size" for --bits runs)
    bit_options: tuple[int, ...] = ()            # a --bits study's bit-width per option index (0: the checkpoint's)


def non_dominated(esap: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """Mask of points no other point beats on both ESAP (higher) and memory (lower)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    mask = np.zeros(len(esap), dtype=bool)
    if len(esap):
        F = np.column_stack([-np.asarray(esap, float), np.asarray(memory, float)])
        mask[NonDominatedSorting().do(F, only_non_dominated_front=True)] = True
    return mask


def hypervolume(esap: np.ndarray, memory_gb: np.ndarray, ref_memory_gb: float) -> float:
    """Exact 2-D hypervolume of ``[-esap, memory_gb]`` w.r.t. ``[0, ref_memory_gb]``; points past it add 0."""
    from pymoo.indicators.hv import HV

    F = np.column_stack([-np.asarray(esap, float), np.asarray(memory_gb, float)])
    return float(HV(ref_point=np.array([0.0, float(ref_memory_gb)]))(F)) if len(F) else 0.0


def is_uniform(counts: Sequence[int], num_experts: Sequence[int] | None = None) -> bool:
    """True when ``counts`` is the uniform allocation of its own budget: every layer within one expert of
    ``budget * E_l / sum(E)`` (what largest-remainder rounding produces). Equal E when not known."""
    c = np.asarray(counts, float)
    if c.size == 0:
        return False
    e = np.ones_like(c) if num_experts is None else np.asarray(num_experts, float)
    return bool(np.all(np.abs(c - c.sum() * e / e.sum()) < 1.0))


def _uniform_both(plan: Sequence[int]) -> bool:
    """A joint plan with one count and one bit-width in every layer (the uniform-both baselines; with every expert
    kept, the quantize-only ones)."""
    n = len(plan) // 2
    return len(set(plan[:n])) == 1 and len(set(plan[n:])) == 1


def _num_experts(source: Source) -> list[int] | None:
    if source.plan is not None:
        return [lp.num_experts for lp in source.plan.layers]
    ne = source.study_attrs.get("num_experts")
    return [int(v) for v in (ne.values() if isinstance(ne, dict) else ne)] if ne else None


def reference_memory_bytes(source: Source, points: list[Evaluation], override_gb: float | None = None) -> float:
    """Total routed-expert memory of the unpruned model (the fixed HV reference).

    In order: the explicit override, the study's ``total_expert_bytes`` attr, or experts per layer (plan.json)
    times bytes per expert solved from the evaluated plans (memory = counts @ bytes_per_expert, exact).
    """
    if override_gb is not None:
        return float(override_gb) * GB
    if source.study_attrs.get("total_expert_bytes"):
        return float(source.study_attrs["total_expert_bytes"])
    experts = _num_experts(source)
    if experts is not None and points:
        C = np.array([p.counts for p in points], float)
        m = np.array([p.memory_bytes for p in points], float)
        if C.shape[1] == len(experts):
            per_expert = m / C.sum(axis=1)
            if np.allclose(per_expert, per_expert[0], rtol=1e-9):       # the common case: equal-sized experts
                return float(per_expert[0] * sum(experts))
            if np.linalg.matrix_rank(C) == C.shape[1]:
                bpe = np.linalg.lstsq(C, m, rcond=None)[0]
                return float(np.asarray(experts, float) @ bpe)
    raise AllocoptError(f"cannot tell the unpruned expert memory of {source.name} (the fixed hypervolume reference); "
                        "pass the run directory that holds plan.json, or --ref-memory-gb")


def _front_file_points(path: Path) -> list[Evaluation]:
    """front.json: a list of {counts, esap|value, memory_bytes}, or an object holding that list as "points"."""
    fix = "it must list {counts, esap, memory_bytes} points"
    obj = read_json(path, str(path), fix)
    try:
        rows = obj["points"] if isinstance(obj, dict) else obj
        return [Evaluation(-1, float(r["esap"] if "esap" in r else r["value"]), float(r["memory_bytes"]),
                           tuple(int(c) for c in r["counts"]), "nsga2", False) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise AllocoptError(f"{path} is malformed ({exc!r}); {fix}") from exc


def _points(source: Source) -> tuple[list[Evaluation], str]:
    """A two-objective study has every evaluated point; front.json (the final front) is the fallback."""
    if source.study is not None and len(source.directions) == 2:
        return source.evaluations(), "study"
    if source.front_file is not None:
        return _front_file_points(source.front_file), "front.json"
    if source.study is not None:
        optimizers = sorted({e.optimizer for e in source.evaluations()})
        raise AllocoptError(f"study {source.name!r} is single-objective (optimizer {', '.join(optimizers)}) and its run has "
                            "no front.json, so there is no memory front; plot a run made with --optimizer nsga2")
    raise AllocoptError(f"{source.name} has neither an Optuna study nor front.json; pass an nsga2 run directory, "
                        "its .db file, or --storage URL --study NAME")


def pareto_data(source: Source, ref_memory_gb: float | None = None) -> ParetoData:
    evals, origin = _points(source)
    points = [e for e in evals if math.isfinite(e.esap) and math.isfinite(e.memory_bytes)]
    if not points:
        raise AllocoptError(f"{source.name} has no evaluation with both ESAP and memory; run an nsga2 search first")
    esap = np.array([p.esap for p in points])
    mem = np.array([p.memory_bytes for p in points])
    front = non_dominated(esap, mem)
    experts = _num_experts(source)
    bits = tuple(int(b) for b in source.study_attrs.get("bits") or ())   # a --bits study's bit-width options
    if bits:                                       # joint plans (--bits): counts then bit-width options per layer
        uniform = np.array([p.uniform or _uniform_both(p.counts) for p in points])
    else:
        uniform = np.array([p.uniform or is_uniform(p.counts, experts) for p in points])
    ref = reference_memory_bytes(source, points, ref_memory_gb)
    memory = "export size (every tensor, packed experts included)" if bits else ParetoData.memory
    return ParetoData(source.name, points, front, uniform, ref, hypervolume(esap[front], mem[front] / GB, ref / GB), origin,
                      memory, bits if origin == "study" else ())


def _pick_source(sources: list[Source]) -> Source:
    if len(sources) == 1:
        return sources[0]
    multi = [s for s in sources if s.study is not None and len(s.directions) == 2]
    if len(multi) == 1:
        return multi[0]
    raise AllocoptError(f"{len(sources)} studies found ({', '.join(s.name for s in sources)}) and the Pareto plot draws one; "
                        "pass --study NAME")


def draw_pareto(data: ParetoData):
    """The figure: grey cloud, front as a step line, uniform plans as diamonds, HV in the title."""
    scale, unit = next(u for u in _UNITS if data.ref_memory_bytes >= u[0])
    esap = np.array([p.esap for p in data.points])
    mem = np.array([p.memory_bytes for p in data.points]) / scale
    fig, ax = new_figure()
    rest = ~data.on_front
    if rest.any():
        ax.scatter(mem[rest], esap[rest], s=12, c="0.75", label=f"evaluated ({len(data.points)})", zorder=1)
    order = np.flatnonzero(data.on_front)[np.argsort(mem[data.on_front], kind="stable")]
    ax.step(mem[order], esap[order], where="post", color="tab:blue", lw=1.8, marker="o", ms=4,
            label=f"Pareto front ({len(order)})", zorder=2)
    if data.uniform.any():
        label = "uniform both (one count and bit-width)" if "export" in data.memory else "uniform"
        ax.scatter(mem[data.uniform], esap[data.uniform], s=55, marker="D", facecolors="none", edgecolors="tab:red",
                   linewidths=1.5, label=label, zorder=3)
    ax.set_xlabel(f"{data.memory} [{unit}]")
    ax.set_ylabel("ESAP (higher is better)")
    ax.set_title(f"{data.name}: ESAP vs expert memory\nhypervolume {data.hypervolume:.4g} ESAP·GB "
                 f"(ref: ESAP 0, {data.ref_memory_bytes / GB:.4g} GB = unpruned "
                 f"{'export' if 'export' in data.memory else 'experts'})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def write_pareto(data: ParetoData, out: Path) -> dict[str, Path]:
    """pareto.png, pareto.csv (one row per point: kept counts per layer, and for a --bits study the bit-width per
    layer, 0 for the checkpoint's precision) and pareto.json (hypervolume and counts of points)."""
    def layers(p: Evaluation) -> tuple[str, ...]:
        if not data.bit_options:
            return (counts_field(p.counts),)
        n = len(p.counts) // 2                  # a joint plan: counts, then bit-width option indices
        return counts_field(p.counts[:n]), counts_field([data.bit_options[j] for j in p.counts[n:]])

    rows = [(p.number if p.number >= 0 else "", f"{p.esap:.10g}", int(p.memory_bytes), f"{p.memory_bytes / GB:.10g}",
             int(f), int(u), *layers(p)) for p, f, u in zip(data.points, data.on_front, data.uniform)]
    columns = ["trial", "esap", "memory_bytes", "memory_gb", "on_front", "uniform", "counts"] + ["bits"] * bool(data.bit_options)
    summary: dict[str, Any] = {
        "study": data.name, "source": data.source, "hypervolume": data.hypervolume,
        "hypervolume_space": "[-ESAP, expert memory GB], minimised",
        "reference_point": [0.0, data.ref_memory_bytes / GB], "reference_memory_bytes": data.ref_memory_bytes,
        "points": len(data.points), "front_points": int(data.on_front.sum()), "uniform_points": int(data.uniform.sum()),
    }
    return {
        "png": save_figure(draw_pareto(data), out / "pareto.png"),
        "csv": save_csv(out / "pareto.csv", columns, rows),
        "json": save_json(out / "pareto.json", summary),
    }


def plot_pareto(targets: Sequence[str], out: str | Path | None = None, storage: str | None = None,
                study_name: str | None = None, ref_memory_gb: float | None = None) -> dict[str, Path]:
    """Resolve the study, compute front + hypervolume, write pareto.png/.csv/.json into ``out``."""
    sources = resolve_sources(targets, storage, study_name)
    source = _pick_source(sources)
    return write_pareto(pareto_data(source, ref_memory_gb), Path(out) if out else default_out_dir(source.run_dir))
