"""Does the allocation matter? Uniform, global, GRAPE, the sensitivity DP and the searched (ga) allocation, per
criterion and sparsity.

    python benchmarks/allocation_matters.py                                   # the full grid, default budget
    python benchmarks/allocation_matters.py --criteria reap,ean --sparsities 0.5 --seeds 3 --evals 100 --limit 100

Every allocation is a real ``allocopt run`` (``run_search``) whose study lands under ``<out>/allocation_matters/``
(calibration statistics are observed once and reused by every sibling run). Each resulting plan is then applied
with ``mask_experts`` to one loaded copy of the model and scored on the held-out tasks (``evaluate``). Writes
``allocation_matters.md`` (the table), ``allocation_matters.json`` (every raw number) and
``allocation_matters_density.png`` (+ .csv) into ``<out>``.

Uniform, global, GRAPE and dp (the sensitivity DP, ga's warm start, at the same budget) are deterministic and run
once; ga runs once per seed and is reported as mean±std.
``allocopt run`` never returns a plan worse than uniform, so a baseline that scores below uniform would come back
as the uniform plan; here each baseline is read back from its study as the plan the optimizer itself proposed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from allocopt.config import shipped_corpus
from allocopt import defaults as D
from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_json, atomic_write_text

CRITERIA = ("frequency", "ean", "seer", "reap", "man", "msan")
SPARSITIES = (0.25, 0.5)
BASELINES = ("uniform", "global", "grape", "dp")     # one plan each, no seed dependence
SEARCHED = "ga"
DOMAINS = ("code", "prose", "math")
REPORT = "allocation_matters"
# The goal at 50% sparsity: searched beats uniform on math EM by >= 5 points with MC/ppl no worse than 1 point.
GOAL_SPARSITY, GOAL_MATH_PTS, GOAL_SLACK_PTS = 0.5, 5.0, 1.0


def log(message: str) -> None:
    print(message, flush=True)


# ---- one allocation: its run and plan.json ----------------------------------------------------------------------

def search(model: str, criterion: str, sparsity: float, optimizer: str, seed: int, evals: int, runs: Path,
           data: str = D.SEARCH_DATA, search_seqs: int = D.SEARCH_SEQS) -> dict:
    """``run_search`` for one allocation; returns the plan's counts, kept ids and ESAP on the search set."""
    from allocopt.config import RunConfig
    from allocopt.plan import Plan
    from allocopt.pipeline import run_search

    given = {"model": model, "criterion": criterion, "sparsity": sparsity, "optimizer": optimizer, "seed": seed,
             "evals": evals, "data": data, "search_num_seqs": search_seqs}
    config = RunConfig.from_sources(None, {**given, "out": str(runs / RunConfig.from_sources(None, given).name)})
    result = run_search(config, progress=False)
    plan = Plan.load(result.plan_path)
    kept, esap = plan.kept, float(result.summary["esap"])
    counts = [len(kept[lp.index]) for lp in plan.layers]
    return {"criterion": criterion, "sparsity": sparsity, "allocation": optimizer, "seed": seed,
            "run_name": config.name, "run_dir": str(config.run_dir), "esap": esap,
            "uniform_esap": float(result.summary["uniform_esap"]), "evaluations": int(result.summary["evaluations"]),
            "counts": counts, "kept": {str(l): list(ids) for l, ids in kept.items()},
            "num_experts": {str(lp.index): lp.num_experts for lp in plan.layers},
            "model_fingerprint": plan.model_fingerprint, "search_seconds": float(result.summary["wall_time_s"])}


# ---- held-out evaluation, cached beside each run --------------------------------------------------------------

def heldout(model, tokenizer, kept: dict[int, Sequence[int]] | None, limit: int | None, cache: Path,
            corpus: str = "testbed") -> dict:
    """``evaluate`` under ``mask_experts`` (the full model when ``kept`` is None); reused when plan and limit match."""
    from allocopt.evaluation import evaluate
    from allocopt.models import mask_experts, model_fingerprint

    key = {"model_fingerprint": model_fingerprint(model), "limit": limit, "corpus": corpus,
           "kept": None if kept is None else {str(l): sorted(int(e) for e in ids) for l, ids in sorted(kept.items())}}
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["metrics"]
    if kept is None:
        metrics = evaluate(model, tokenizer, limit=limit, corpus=corpus)
    else:
        with mask_experts(model, {int(l): list(ids) for l, ids in kept.items()}):
            metrics = evaluate(model, tokenizer, limit=limit, corpus=corpus)
    atomic_write_json(cache, {"key": key, "metrics": metrics})
    return metrics


# ---- aggregation and the markdown table -----------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float | None]:
    if any(math.isnan(v) for v in values):
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (criterion, sparsity, allocation): means (and sample std over ga seeds) plus deltas vs uniform."""
    rows: list[dict] = []
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["criterion"], run["sparsity"], run["allocation"]), []).append(run)
    for (criterion, sparsity, allocation), group in groups.items():
        metrics = {"esap": [r["esap"] for r in group],
                   "math_em": [100 * r["heldout"]["math_em"] for r in group],
                   "code_em": [100 * r["heldout"]["code_em"] for r in group],
                   "mc_acc": [100 * r["heldout"]["mc_acc"] for r in group],
                   # held-out results recorded before the metric existed have none: nan, shown as n/a
                   "code_edit_sim": [r["heldout"].get("code_edit_sim", math.nan) for r in group],
                   **{f"ppl_{d}": [r["heldout"]["ppl"][d] for r in group] for d in DOMAINS}}
        row = {"criterion": criterion, "sparsity": sparsity, "allocation": allocation,
               "seeds": [r["seed"] for r in group]}
        for name, values in metrics.items():
            row[name], row[f"{name}_std"] = _stats(values)
        rows.append(row)
    uniform = {(r["criterion"], r["sparsity"]): r for r in rows if r["allocation"] == "uniform"}
    for row in rows:
        base = uniform.get((row["criterion"], row["sparsity"]))
        if base is None:
            continue
        row["d_math_em"] = row["math_em"] - base["math_em"]
        row["d_mc_acc"] = row["mc_acc"] - base["mc_acc"]
        row["d_ppl"] = {d: row[f"ppl_{d}"] - base[f"ppl_{d}"] for d in DOMAINS}
        row["d_ppl_rel"] = {d: row[f"ppl_{d}"] / base[f"ppl_{d}"] - 1.0 for d in DOMAINS}
    return rows


def goal_check(rows: list[dict]) -> list[dict]:
    """Per criterion at 50%: ga mean vs uniform, math EM >= +5 pts, MC >= -1 pt, each domain's ppl <= +1."""
    out = []
    for row in rows:
        if row["allocation"] != SEARCHED or row["sparsity"] != GOAL_SPARSITY or "d_math_em" not in row:
            continue
        worst = _worst_domain(row)
        checks = {"math_em": row["d_math_em"] >= GOAL_MATH_PTS, "mc_acc": row["d_mc_acc"] >= -GOAL_SLACK_PTS,
                  "ppl": row["d_ppl"][worst] <= GOAL_SLACK_PTS}
        out.append({"criterion": row["criterion"], "d_math_em": row["d_math_em"], "d_mc_acc": row["d_mc_acc"],
                    "worst_domain": worst, "worst_d_ppl": row["d_ppl"][worst], "worst_d_ppl_rel": row["d_ppl_rel"][worst],
                    "checks": checks, "met": all(checks.values())})
    return out


def _worst_domain(row: dict) -> str:
    """The domain whose perplexity rose most (absolute) against uniform."""
    return max(DOMAINS, key=lambda d: row["d_ppl"][d])


def _pm(mean: float, std: float | None, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}±{std:.{digits}f}"


def markdown(report: dict) -> str:
    cfg, full = report["config"], report["full_model"]
    lines = [
        "# Does the allocation matter? (benchmarks/allocation_matters.py)",
        "",
        f"Model `{cfg['model']}`; calibration and search data `{cfg['data']}`, "
        f"{cfg.get('search_seqs', D.SEARCH_SEQS)} search rows; criteria {', '.join(cfg['criteria'])}; "
        f"sparsity {', '.join(f'{s:g}' for s in cfg['sparsities'])}; "
        f"ga budget {cfg['evals']} evaluations, seeds {', '.join(map(str, cfg['seeds']))}; held-out items per task: "
        f"{cfg['limit'] if cfg['limit'] is not None else 'task defaults'}; "
        f"this invocation took {report['wall_seconds'] / 60:.1f} min (studies and held-out results already under "
        f"`{Path(cfg['runs_dir']).name}/` are reused, not recomputed).",
        "ESAP on the search split (higher is better); held-out math/code exact match and MC accuracy in %, "
        "perplexity per domain (lower is better). Deltas are against uniform with the same criterion and sparsity "
        "(points; Δppl is the worst domain, absolute and relative). ga rows: mean±std over seeds.",
        "",
        f"Full model: math EM {100 * full['math_em']:.1f}, code EM {100 * full['code_em']:.1f}, MC {100 * full['mc_acc']:.1f}, "
        "ppl " + ", ".join(f"{d} {full['ppl'][d]:.3f}" for d in DOMAINS) + ".",
        "",
        "| criterion | sparsity | allocation | ESAP (search) | math EM | code EM | code edit sim | MC acc | ppl code | ppl prose | ppl math "
        "| Δ math EM | Δ MC | Δ ppl (worst) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        label = r["allocation"] if len(r["seeds"]) == 1 or r["allocation"] in BASELINES else f"{r['allocation']} ({len(r['seeds'])} seeds)"
        cells = [r["criterion"], f"{r['sparsity']:g}", label, _pm(r["esap"], r["esap_std"], 4),
                 _pm(r["math_em"], r["math_em_std"], 1), _pm(r["code_em"], r["code_em_std"], 1),
                 _pm(r["code_edit_sim"], r["code_edit_sim_std"], 3), _pm(r["mc_acc"], r["mc_acc_std"], 1),
                 *(_pm(r[f"ppl_{d}"], r[f"ppl_{d}_std"], 3) for d in DOMAINS)]
        if "d_math_em" in r and r["allocation"] != "uniform":
            worst = _worst_domain(r)
            cells += [f"{r['d_math_em']:+.1f}", f"{r['d_mc_acc']:+.1f}",
                      f"{r['d_ppl'][worst]:+.3f} ({100 * r['d_ppl_rel'][worst]:+.1f}%, {worst})"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if report["goal"]:
        lines += ["", f"Goal at {GOAL_SPARSITY:g} sparsity (ga mean vs uniform: math EM ≥ +{GOAL_MATH_PTS:g} pts, "
                  f"MC ≥ −{GOAL_SLACK_PTS:g} pt, every domain's ppl ≤ +{GOAL_SLACK_PTS:g}):", "",
                  "| criterion | Δ math EM | Δ MC | worst Δ ppl | met |", "|---|---|---|---|---|"]
        for g in report["goal"]:
            failed = [k for k, ok in g["checks"].items() if not ok]
            lines.append(f"| {g['criterion']} | {g['d_math_em']:+.1f} | {g['d_mc_acc']:+.1f} | {g['worst_d_ppl']:+.3f} "
                         f"({100 * g['worst_d_ppl_rel']:+.1f}%, {g['worst_domain']}) | {'yes' if g['met'] else 'no (' + ', '.join(failed) + ')'} |")
        met = sum(g["met"] for g in report["goal"])
        lines += ["", f"Goal met for {met} of {len(report['goal'])} criteria."]
    if report.get("density"):
        lines += ["", f"Per-layer kept density ({report['density']['criterion']}, sparsity "
                  f"{report['density']['sparsity']:g}): `{Path(report['density']['png']).name}`."]
    return "\n".join(lines) + "\n"


# ---- density plot ---------------------------------------------------------------------------------------------

def density_plot(runs: list[dict], criterion: str, sparsity: float, out: Path) -> dict[str, str]:
    """uniform, global, grape, dp and every ga seed for one criterion and sparsity, via allocopt.plotting.density."""
    from allocopt.plan import PLAN_FILE, Plan
    from allocopt.plotting.density import PlanSeries, draw_density
    from allocopt.plotting.output import save_csv, save_figure

    series = []
    for run in runs:
        if run["criterion"] != criterion or run["sparsity"] != sparsity:
            continue
        label = run["allocation"] + (f" seed {run['seed']}" if run["allocation"] == SEARCHED else "")
        series.append(PlanSeries(f"{label}, ESAP {run['esap']:.4f}", Path(run["run_dir"]),
                                 Plan.load(Path(run["run_dir"]) / PLAN_FILE)))
    fig = draw_density(series)
    fig.axes[0].set_title(f"Kept experts per MoE layer: {criterion} ranking, {sparsity:g} sparsity", fontsize=10)
    rows = [(s.label, lp.index, lp.num_experts, len(lp.kept), f"{len(lp.kept) / lp.num_experts:.10g}")
            for s in series for lp in s.plan.layers]
    return {"png": str(save_figure(fig, out / f"{REPORT}_density.png")),
            "csv": str(save_csv(out / f"{REPORT}_density.csv", ["label", "layer", "num_experts", "kept", "density"], rows))}


# ---- driver ---------------------------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=D.MODEL, help="model spec [default: the testbed]")
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="comma-separated criterion names")
    ap.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES), help="comma-separated, e.g. 0.25,0.5")
    ap.add_argument("--seeds", type=int, default=3, help=f"ga seeds ({D.SEED}, {D.SEED + 1}, ...)")
    ap.add_argument("--evals", type=int, default=D.EVALUATIONS, help="ga search budget (distinct plans)")
    ap.add_argument("--data", default=D.SEARCH_DATA, help="calibration and search data of every run, e.g. testbed:math "
                    "(use another --out: run names do not include the data)")
    ap.add_argument("--search-seqs", type=int, default=D.SEARCH_SEQS, help="rows of the search set (ESAP) of every "
                    "run [default: %(default)s] (use another --out: run names do not include it)")
    ap.add_argument("--tasks-from", default=None, help="held-out tasks of the testbed or deep corpus [default: by --model]")
    ap.add_argument("--limit", type=int, default=None, help="held-out items per task [default: the task defaults]")
    ap.add_argument("--out", default=str(Path(D.STUDIES_DIR) / "reports"), help="report directory; runs go to OUT/allocation_matters/")
    args = ap.parse_args(argv)
    args.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError as exc:
        raise AllocoptError(f"--sparsities must be comma-separated numbers like 0.25,0.5 ({exc})") from exc
    for name, value, low in (("--seeds", args.seeds, 1), ("--evals", args.evals, 1), ("--limit", args.limit, 1),
                             ("--search-seqs", args.search_seqs, 1)):
        if value is not None and value < low:
            raise AllocoptError(f"{name} must be >= {low}, got {value}; raise it")
    if not args.criteria or not args.sparsities:
        raise AllocoptError("--criteria and --sparsities need at least one value each; e.g. --criteria reap --sparsities 0.5")
    from allocopt.criteria import get_criterion

    for criterion in args.criteria:             # unknown names fail here, before any model loads
        get_criterion(criterion)
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid and write the report; returns the report (also written as JSON)."""
    from transformers.utils import logging as hf_logging

    from allocopt.runtime import load_model

    args = _parse(argv)
    start = time.perf_counter()
    hf_logging.disable_progress_bar()                # one progress line per plan instead of loading bars
    out = Path(args.out)
    runs_dir = out / REPORT
    runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(runs_dir / ".gitignore", "# studies, statistics and caches of benchmarks/allocation_matters.py\n*\n")
    seeds = [D.SEED + i for i in range(args.seeds)]
    plan_list = [(c, s, a, D.SEED) for c in args.criteria for s in args.sparsities for a in BASELINES]
    plan_list += [(c, s, SEARCHED, seed) for c in args.criteria for s in args.sparsities for seed in seeds]
    plan_list.sort(key=lambda p: (args.criteria.index(p[0]), -p[1]))   # the headline sparsity (50%) first

    model, tokenizer = load_model(args.model)
    t = time.perf_counter()
    corpus = args.tasks_from or shipped_corpus(args.model) or "testbed"
    full = heldout(model, tokenizer, None, args.limit, runs_dir / "full-heldout.json", corpus)
    log(f"[full model] math EM {100 * full['math_em']:.1f}  MC {100 * full['mc_acc']:.1f}  ({time.perf_counter() - t:.0f} s)")
    runs = []
    for i, (criterion, sparsity, allocation, seed) in enumerate(plan_list, 1):
        t = time.perf_counter()
        run_info = search(args.model, criterion, sparsity, allocation, seed, args.evals, runs_dir, args.data,
                          args.search_seqs)
        t_search = time.perf_counter() - t
        kept = {int(l): ids for l, ids in run_info["kept"].items()}
        run_info["heldout"] = heldout(model, tokenizer, kept, args.limit, Path(run_info["run_dir"]) / "heldout.json",
                                      corpus)
        runs.append(run_info)
        h = run_info["heldout"]
        log(f"[{i}/{len(plan_list)}] {criterion} s{sparsity:g} {allocation} seed {seed}: ESAP {run_info['esap']:.4f} "
            f"(uniform {run_info['uniform_esap']:.4f}, {run_info['evaluations']} evals)  math EM {100 * h['math_em']:.1f}  "
            f"code EM {100 * h['code_em']:.1f}  code edit sim {h.get('code_edit_sim', math.nan):.3f}  MC {100 * h['mc_acc']:.1f}  "
            f"ppl {' '.join(format(h['ppl'][d], '.3f') for d in DOMAINS)}  "
            f"(search {t_search:.0f} s, eval {time.perf_counter() - t - t_search:.0f} s)")

    rows = summarise(runs)
    criterion = D.CRITERION if D.CRITERION in args.criteria else args.criteria[0]
    sparsity = GOAL_SPARSITY if GOAL_SPARSITY in args.sparsities else max(args.sparsities)
    report = {"config": {"model": args.model, "data": args.data, "search_seqs": args.search_seqs,
                         "criteria": args.criteria, "sparsities": args.sparsities,
                         "seeds": seeds, "evals": args.evals, "limit": args.limit, "runs_dir": str(runs_dir)},
              "full_model": full, "rows": rows, "goal": goal_check(rows), "runs": runs,
              "density": {"criterion": criterion, "sparsity": sparsity, **density_plot(runs, criterion, sparsity, out)},
              "wall_seconds": round(time.perf_counter() - start, 1)}
    paths = [atomic_write_json(out / f"{REPORT}.json", report), atomic_write_text(out / f"{REPORT}.md", markdown(report))]
    log("wrote " + ", ".join(str(p) for p in [*paths, report["density"]["png"]]))
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except AllocoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
