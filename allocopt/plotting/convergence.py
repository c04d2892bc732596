"""Best ESAP found so far against the number of evaluations, one line per optimizer.

Evaluations, not wall time, are the x axis: every optimizer pays the same price per evaluated plan, so the
curves compare sample efficiency. Failed evaluations count (they cost a forward pass) but never raise the best.

Example::

    paths = plot_convergence(["studies/ga-run", "studies/cmaes-run"])
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
        for e in src.evaluations():
            if budget is not None and e.counts and sum(e.counts) != int(budget):
                e = replace(e, esap=math.nan)
            by_opt.setdefault(e.optimizer, []).append(e)
        groups += [(src.name, opt, evals) for opt, evals in by_opt.items() if opt != UNIFORM]
    seen = Counter(opt for _, opt, _ in groups)
    return [Curve(opt if seen[opt] == 1 else f"{opt} ({study})", study, opt, evals) for study, opt, evals in groups]


def uniform_levels(sources: Sequence[Source]) -> dict[str, float]:
    """Uniform-plan ESAP per source where known (plan.json's uniform_esap or a trial marked uniform)."""
    return {s.name: u for s in sources if (u := s.uniform_esap) is not None and math.isfinite(u)}


def draw_convergence(lines: list[Curve], uniform: dict[str, float]):
    fig, ax = new_figure()
    for c in lines:
        x = np.arange(1, len(c.evaluations) + 1)
        ax.step(x, c.best_so_far, where="post", lw=1.8, label=f"{c.label} (best {c.best:.4f})" if c.best is not None else f"{c.label} (all failed)")
    distinct = sorted({round(v, 12) for v in uniform.values()})
    for v in distinct:
        who = [n for n, u in uniform.items() if round(u, 12) == v]
        suffix = f" [{', '.join(who)}]" if len(distinct) > 1 else ""
        ax.axhline(v, ls="--", color="0.35", lw=1.2, label=f"uniform plan, ESAP {v:.4f}{suffix}")
    ax.set_xlabel("evaluations (plans scored)")
    ax.set_ylabel("best ESAP so far")
    ax.set_title("Search convergence", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_convergence(targets: Sequence[str], out: str | Path | None = None, storage: str | None = None,
                     study_name: str | None = None) -> dict[str, Path]:
    """Write convergence.png, convergence.csv (every evaluation with its running best) and convergence.json."""
    sources = resolve_sources(targets, storage, study_name)
    lines = curves(sources)
    if not lines:
        raise AllocoptError(f"{', '.join(s.name for s in sources)} hold only the uniform plan; nothing converges there, "
                            "pass a study whose optimizer searched")
    uniform = uniform_levels(sources)
    run_dirs = [s.run_dir for s in sources if s.run_dir is not None]
    out = Path(out) if out else default_out_dir(run_dirs[0] if run_dirs else None)
    rows = [(c.label, c.study, c.optimizer, i + 1, e.number, f"{e.esap:.10g}", f"{b:.10g}")
            for c in lines for i, (e, b) in enumerate(zip(c.evaluations, c.best_so_far))]
    summary = {
        "curves": [{"label": c.label, "study": c.study, "optimizer": c.optimizer, "evaluations": len(c.evaluations),
                    "best_esap": c.best} for c in lines],
        "uniform_esap": uniform,
    }
    return {
        "png": save_figure(draw_convergence(lines, uniform), out / "convergence.png"),
        "csv": save_csv(out / "convergence.csv",
                        ["label", "study", "optimizer", "evaluation", "trial", "esap", "best_so_far"], rows),
        "json": save_json(out / "convergence.json", summary),
    }
