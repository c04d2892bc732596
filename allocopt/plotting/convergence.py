"""Best ESAP found so far against the search's cost, one line per optimizer.

The x axis is one of
* ``evaluations`` (default): full-fidelity evaluation equivalents. A plan scored on all search rows counts 1, a plan
  racing pruned after r of R rows counts r / R, so searches with and without racing compare at equal data read;
* ``tokens``: decoder layer-tokens forwarded (rows x tokens x layers actually run, the trials' ``layer_tokens``):
  the compute, prefix reuse included;
* ``seconds``: wall-clock since the study's first trial started (a resumed study includes the pause).
Failed evaluations count (they cost a forward pass) but never raise the best; pruned plans count their cost only.

Example::

    paths = plot_convergence(["studies/ga-run", "studies/cmaes-run"], x="tokens")
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.plotting.output import default_out_dir, new_figure, save_csv, save_figure, save_json
from allocopt.plotting.sources import Evaluation, Source, resolve_sources

UNIFORM = "uniform"   # the uniform plan is one evaluation: drawn as a reference line, not as a curve
AXES = {"evaluations": "full-fidelity evaluation equivalents", "tokens": "decoder layer-tokens forwarded",
        "seconds": "wall-clock seconds"}


@dataclass(frozen=True)
class Curve:
    label: str
    study: str
    optimizer: str
    evaluations: list[Evaluation]

    @property
    def values(self) -> np.ndarray:
        return np.array([e.esap for e in self.evaluations], float)

    @property
    def best_so_far(self) -> np.ndarray:
        """Running max ignoring failed (NaN) evaluations; NaN until the first success."""
        v = np.where(np.isnan(self.values), -np.inf, self.values)
        best = np.maximum.accumulate(v)
        return np.where(np.isneginf(best), np.nan, best)

    def x(self, axis: str) -> np.ndarray:
        """Cumulative cost after each evaluation on ``axis`` (see the module docstring); NaN where not recorded."""
        if axis == "seconds":
            return np.array([e.seconds for e in self.evaluations], float)
        if axis == "tokens":
            return np.cumsum([e.layer_tokens for e in self.evaluations])
        full_rows = max((e.rows for e in self.evaluations if not e.pruned and e.rows), default=None)
        return np.cumsum([(e.rows / full_rows) if e.pruned and e.rows and full_rows else 1.0 for e in self.evaluations])

    @property
    def best(self) -> float | None:
        finite = self.values[np.isfinite(self.values)]
        return float(finite.max()) if finite.size else None


def curves(sources: Sequence[Source]) -> list[Curve]:
    """Trials of each study grouped by their ``optimizer`` attr, in evaluation order.

    An optimizer that appears in several studies gets the study name in its label so seeds stay apart. Plans
    off the run's budget (NSGA-II explores a range of budgets) count as evaluations but never as the best, so
    every curve compares plans of the same size.
    """
    groups: list[tuple[str, str, list[Evaluation]]] = []
    for src in sources:
        budget = src.study_attrs.get("budget")
        by_opt: dict[str, list[Evaluation]] = {}
        for e in src.evaluations(pruned=True):
            if _off_budget(e, budget):
                e = replace(e, esap=math.nan, off_budget=True)
            by_opt.setdefault(e.optimizer, []).append(e)
        groups += [(src.name, opt, evals) for opt, evals in by_opt.items() if opt != UNIFORM]
    seen = Counter(opt for _, opt, _ in groups)
    return [Curve(opt if seen[opt] == 1 else f"{opt} ({study})", study, opt, evals) for study, opt, evals in groups]


def _off_budget(e: Evaluation, budget) -> bool:
    """A plan off the run's budget: the trial's own constraints where the study recorded them (a byte budget, a
    --bits search), else (older studies) a count of experts other than the budget's."""
    if e.feasible is not None:
        return not e.feasible
    return budget is not None and bool(e.counts) and sum(e.counts) != int(budget)


def uniform_levels(sources: Sequence[Source]) -> dict[str, float]:
    """Uniform-plan ESAP per source where known (plan.json's uniform_esap or a trial marked uniform)."""
    return {s.name: u for s in sources if (u := s.uniform_esap) is not None and math.isfinite(u)}


def draw_convergence(lines: list[Curve], uniform: dict[str, float], axis: str = "evaluations"):
    fig, ax = new_figure()
    for c in lines:
        ax.step(c.x(axis), c.best_so_far, where="post", lw=1.8, label=f"{c.label} (best {c.best:.4f})" if c.best is not None else f"{c.label} (all failed)")
    distinct = sorted({round(v, 12) for v in uniform.values()})
    for v in distinct:
        who = [n for n, u in uniform.items() if round(u, 12) == v]
        suffix = f" [{', '.join(who)}]" if len(distinct) > 1 else ""
        ax.axhline(v, ls="--", color="0.35", lw=1.2, label=f"uniform plan, ESAP {v:.4f}{suffix}")
    ax.set_xlabel(AXES[axis])
    if axis == "tokens":
        ax.set_xscale("log")
    ax.set_ylabel("best ESAP so far")
    ax.set_title("Search convergence", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_convergence(targets: Sequence[str], out: str | Path | None = None, storage: str | None = None,
                     study_name: str | None = None, x: str = "evaluations") -> dict[str, Path]:
    """Write convergence.png (best so far against ``x``: evaluations, tokens or seconds), convergence.csv (every
    evaluation with its running best and all three costs) and convergence.json."""
    if x not in AXES:
        raise AllocoptError(f"unknown x axis {x!r}; use one of {', '.join(AXES)}")
    sources = resolve_sources(targets, storage, study_name)
    lines = curves(sources)
    if not lines:
        raise AllocoptError(f"{', '.join(s.name for s in sources)} hold only the uniform plan; nothing converges there, "
                            "pass a study whose optimizer searched")
    missing = [c.label for c in lines if x != "evaluations" and np.isnan(c.x(x)).any()]
    if missing:
        raise AllocoptError(f"{', '.join(missing)} did not record {AXES[x]} for every trial (studies written before "
                            "allocopt recorded layer_tokens); plot them with --x evaluations")
    uniform = uniform_levels(sources)
    run_dirs = [s.run_dir for s in sources if s.run_dir is not None]
    out = Path(out) if out else default_out_dir(run_dirs[0] if run_dirs else None)
    rows = [(c.label, c.study, c.optimizer, i + 1, e.number, "pruned" if e.pruned else "",
             "off budget: a probe, never the best" if e.off_budget else "", f"{e.esap:.10g}", f"{b:.10g}",
             f"{q:.10g}", f"{t:.10g}", f"{sec:.10g}")
            for c in lines for i, (e, b, q, t, sec) in enumerate(zip(c.evaluations, c.best_so_far, c.x("evaluations"),
                                                                     c.x("tokens"), c.x("seconds")))]
    summary = {
        "x": x,
        "curves": [{"label": c.label, "study": c.study, "optimizer": c.optimizer, "evaluations": len(c.evaluations),
                    "pruned": sum(e.pruned for e in c.evaluations), "best_esap": c.best} for c in lines],
        "uniform_esap": uniform,
    }
    return {
        "png": save_figure(draw_convergence(lines, uniform, x), out / "convergence.png"),
        "csv": save_csv(out / "convergence.csv",
                        ["label", "study", "optimizer", "evaluation", "trial", "pruned", "off_budget", "esap", "best_so_far",
                         "equivalents", "layer_tokens", "seconds"], rows),
        "json": save_json(out / "convergence.json", summary),
    }
