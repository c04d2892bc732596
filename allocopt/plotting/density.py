"""Per-layer kept-expert density (kept / E) of one or more plans, against the decoder-layer index.

Comparing schedules (uniform, GRAPE, searched) layer by layer is how the EvoESAP paper reads its results:
where a search moves experts is as informative as how much ESAP it gains.

Example::

    paths = plot_density(["studies/uniform", "studies/ga-run/plan.json"])
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from allocopt.errors import AllocoptError
from allocopt.plan import Plan
from allocopt.plotting.output import default_out_dir, new_figure, save_csv, save_figure
from allocopt.plan import PLAN_FILE

_MARKERS = "osD^v<>ph*"
_LINESTYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class PlanSeries:
    label: str
    path: Path
    plan: Plan

    @property
    def layers(self) -> list[int]:
        return [lp.index for lp in self.plan.layers]

    @property
    def density(self) -> list[float]:
        return [len(lp.kept) / lp.num_experts for lp in self.plan.layers]


def _plan_path(target: str) -> Path:
    path = Path(target)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise AllocoptError(f"{target} is neither a plan file nor a run directory holding {PLAN_FILE}; "
                            "pass the plan.json (or run directory) written by `allocopt run`")
    return path


def _name(path: Path) -> str:
    """A plan.json is named after its run directory; any other file after itself."""
    return path.parent.name if path.name == PLAN_FILE else path.stem


def load_series(targets: Sequence[str]) -> list[PlanSeries]:
    """Plans with legend labels: optimizer+criterion, the file's name when unknown or ambiguous, ESAP if known."""
    if not targets:
        raise AllocoptError("no plan given; pass one or more plan.json files or run directories")
    paths = [_plan_path(t) for t in targets]
    plans = [Plan.load(p) for p in paths]
    bases = []
    for path, plan in zip(paths, plans):
        parts = [str(plan.extra[k]) for k in ("optimizer", "criterion") if plan.extra.get(k)]
        bases.append("+".join(parts) or _name(path))
    repeated = {b for b, n in Counter(bases).items() if n > 1}
    series = []
    for base, path, plan in zip(bases, paths, plans):
        label = f"{base} ({_name(path)})" if base in repeated and base != _name(path) else base
        objective, value, _ = plan.objective_value()
        if value is not None:
            label += f", {objective.upper() if objective == 'esap' else objective} {value:.4f}"
        series.append(PlanSeries(label, path, plan))
    return series


def draw_density(series: list[PlanSeries]):
    fig, ax = new_figure()
    layers = sorted({i for s in series for i in s.layers})
    n = len(series)
    for k, s in enumerate(series):     # earlier plans drawn bigger, so identical schedules stay visible
        under = min(n - 1 - k, 3)
        ax.plot(s.layers, s.density, marker=_MARKERS[k % len(_MARKERS)], ms=4 + 1.5 * under,
                ls=_LINESTYLES[k % len(_LINESTYLES)], lw=1.4 + 0.4 * under, label=s.label)
    ax.set_xlabel("decoder layer index")
    ax.set_ylabel("kept-expert density (kept / E)")
    ax.set_ylim(0.0, 1.05)
    if len(layers) <= 32:
        ax.set_xticks(layers)
    ax.set_title("Kept experts per MoE layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_density(targets: Sequence[str], out: str | Path | None = None) -> dict[str, Path]:
    """Write density.png and density.csv (one row per plan and layer) into ``out`` [default: the first plan's
    directory + ``/plots``]."""
    series = load_series(targets)
    out = Path(out) if out else default_out_dir(series[0].path.parent)     # beside the first plan
    rows = [(s.label, str(s.path), lp.index, lp.num_experts, len(lp.kept), f"{len(lp.kept) / lp.num_experts:.10g}")
            for s in series for lp in s.plan.layers]
    return {
        "png": save_figure(draw_density(series), out / "density.png"),
        "csv": save_csv(out / "density.csv", ["label", "plan", "layer", "num_experts", "kept", "density"], rows),
    }
