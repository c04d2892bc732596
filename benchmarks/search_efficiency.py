"""Search time-to-quality: best full-fidelity ESAP against evaluations, decoder layer-tokens and wall-clock.

    python benchmarks/search_efficiency.py                                   # reap 50% and frequency 25%, 3 seeds
    python benchmarks/search_efficiency.py --problems reap:0.5 --seeds 1 --evals 60 --default-evals 120 \
        --best-known-evals 200 --out /tmp/se                                 # a quick look

Rows, each on the testbed with its real calibration, ranking and search set (16 x 256 tokens):
* ``reference``: the pipeline allocopt comes from: faithful ``evoesap`` (pymoo, EvoESAP's settings) scoring every
  candidate with the naive evaluator of ``esap_throughput.py`` (one full forward per row and candidate, full-vocab
  teacher logits, no prefix reuse, no racing), no study;
* ``allocopt run`` (``run_search``, a fresh SQLite study each) with ``--optimizer``: ``ga`` (the default: sensitivity
  DP warm start, racing, restarts), ``ga-noracing`` (``--option racing=false``), ``ga-nowarm`` (``warm_start=false``:
  what the DP probes buy), ``ga-dprows4`` (``dp_rows=4``: the probes on 4 search rows), ``evoesap``, ``dp``,
  ``cmaes``, ``tpe``, ``random``.
The default runs ``--default-evals`` evaluation equivalents so its curve covers the reference's wall-clock; every
other row runs ``--evals``. ``best-known`` is the best plan of one long default run (``--best-known-evals``) or of any
row, whichever is higher; each row shows the fraction of the uniform -> best-known gap it closes.

Costs, measured from the moment the evaluator is ready (teacher distributions computed) in both pipelines:
evaluation equivalents (a plan scored on r of R rows counts r/R), decoder layer-tokens forwarded for candidates
(rows x tokens x layers actually run: the engine's counter; R x T x layers per naive candidate), seconds. A full
forward of the search set is ``layers x R x T`` layer-tokens: "tokens / full" below is in those units. Targets are
compared on the engine's values (the reference's final best plan is re-scored by the engine, within the certified
1e-4 bound of its exact value). Each (problem, row, seed) result is cached as JSON under ``<out>/search_efficiency/``
(delete it to measure again); ``--fresh`` ignores the cache.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from allocopt import defaults as D
from allocopt.config import default_data
from allocopt.io import atomic_write_json, atomic_write_text

METHODS = {                      # row -> (optimizer, options)
    "ga": ("ga", {}),
    "ga-noracing": ("ga", {"racing": False}),
    "ga-nowarm": ("ga", {"warm_start": False}),          # what the DP warm start buys: the GA from uniform alone
    "ga-dprows4": ("ga", {"dp_rows": 4}),                # warm-start probes on 4 search rows (a quarter of their cost)
    "evoesap": ("evoesap", {}),
    "dp": ("dp", {}),
    "cmaes": ("cmaes", {}),
    "tpe": ("tpe", {}),
    "random": ("random", {}),
}
REFERENCE = "reference"
PROBLEMS = "reap:0.5,frequency:0.25"
WORK = "search_efficiency"


def log(message: str) -> None:
    print(message, flush=True)


# ---- one run --------------------------------------------------------------------------------------------------

def run_allocopt(problem: dict, row: str, seed: int, evals: int, work: Path) -> dict:
    """A fresh ``allocopt run`` (its study and run dir are deleted first) -> best, counts and the cost trace."""
    from allocopt.config import RunConfig
    from allocopt.pipeline import run_search

    optimizer, options = METHODS[row] if row in METHODS else ("ga", {})
    name = f"{row}-seed{seed}"
    runs = work / problem["name"]
    for stale in (runs / name, runs / f"{name}.db"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    config = RunConfig.from_sources(None, {"criterion": problem["criterion"], "sparsity": problem["sparsity"],
                                           "model": problem["model"], "data": problem["data"],
                                           "optimizer": optimizer, "seed": seed, "evals": evals, "options": options,
                                           "out": str(runs / name), "run_name": name})
    result = run_search(config, progress=False)
    s = result.summary
    return {"row": row, "seed": seed, "best": s["esap"], "counts": s["counts"], "uniform": s["uniform_esap"],
            "evaluations": s["evaluations"], "equivalents": s["evaluation_equivalents"], "pruned": s["pruned"],
            "trace": result.trace, "run_dir": str(config.run_dir)}


def _prepared(problem: dict, work: Path):
    """``allocopt.pipeline.prepare`` for the problem on its model and data, its statistics read from the
    calibration file of the problem's first run (a sibling run directory), as every allocopt row saw them."""
    from allocopt.config import RunConfig
    from allocopt.pipeline import prepare

    config = RunConfig.from_sources(None, {"criterion": problem["criterion"], "sparsity": problem["sparsity"],
                                           "model": problem["model"], "data": problem["data"],
                                           "out": str(work / problem["name"] / "reference"), "run_name": "reference"})
    prepared = prepare(config, progress=False)
    if not prepared.calibration_reused:
        raise RuntimeError(f"no calibration file of an allocopt run under {work / problem['name']}; run a row first")
    return prepared


def run_reference(problem: dict, seed: int, evals: int, work: Path) -> dict:
    """Faithful evoesap with the naive evaluator (EvoESAP's pipeline) on the same model, ranking and search set."""
    import torch

    from allocopt.models.adapter import decoder_layers
    from allocopt.search.optimizers import SearchContext, get_optimizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from esap_throughput import NaiveEvaluator

    prepared = _prepared(problem, work)
    model, tokens, space, ranking = prepared.model, prepared.tokens, prepared.space, prepared.ranking
    per_plan = len(decoder_layers(model)[1]) * tokens.input_ids.numel()
    naive = NaiveEvaluator(model, tokens)
    ready, done, trace = time.perf_counter(), [0], []

    def evaluate(X: np.ndarray) -> np.ndarray:
        done[0] += len(X)
        with torch.no_grad():
            return np.array([naive.evaluate(prepared.kept_for(x)) for x in X])

    def on_generation(spent: float, best: float) -> None:
        trace.append({"equivalents": float(spent), "layer_tokens": done[0] * per_plan,
                      "seconds": time.perf_counter() - ready, "best": best})

    ctx = SearchContext(space, evaluate, seed, evals, D.POPULATION, ranking, {}, None, on_generation=on_generation)
    result = get_optimizer("evoesap").run(ctx)
    return {"row": REFERENCE, "seed": seed, "best_naive": float(result.best_value),
            "counts": [int(c) for c in result.best], "evaluations": result.evaluations, "equivalents": result.spent,
            "pruned": 0, "trace": trace, "full_forward": per_plan}


def engine_value(problem: dict, counts: list[int], work: Path) -> float:
    """The engine's value of a plan (what every allocopt row reports)."""
    prepared = _prepared(problem, work)
    [v] = prepared.evaluator.evaluate([prepared.kept_for(counts)])
    return float(v.value)


def cached(path: Path, fresh: bool, make) -> dict:
    if path.is_file() and not fresh:
        return json.loads(path.read_text(encoding="utf-8"))
    out = make()
    atomic_write_json(path, out)
    return out


# ---- reading a trace ------------------------------------------------------------------------------------------

def best_at(trace: list[dict], key: str, limit: float) -> float:
    """Best value after the last trace point whose ``key`` cost is within ``limit`` (NaN before the first point)."""
    ok = [p["best"] for p in trace if p[key] <= limit + 1e-9]
    return max(ok) if ok else math.nan


def first_reach(trace: list[dict], target: float) -> dict | None:
    """The first trace point whose best reaches ``target`` (engine values; 1e-12 slack for float noise)."""
    return next((p for p in trace if p["best"] >= target - 1e-12), None)


def gap(value: float, uniform: float, best_known: float) -> float:
    return (value - uniform) / (best_known - uniform) if best_known > uniform else math.nan


# ---- one problem ----------------------------------------------------------------------------------------------

def measure(problem: dict, args: argparse.Namespace, work: Path) -> dict:
    seeds = [D.SEED + i for i in range(args.seeds)]
    cache_dir = work / problem["name"] / "results"
    t = time.perf_counter()
    long_run = cached(cache_dir / "best-known.json", args.fresh,
                      lambda: run_allocopt(problem, "best-known", D.SEED, args.best_known_evals, work))
    log(f"[{problem['name']}] best-known run: {long_run['best']:.5f} {long_run['counts']} "
        f"({long_run['equivalents']} equivalents, {time.perf_counter() - t:.0f} s)")
    results: dict[str, list[dict]] = {REFERENCE: [], **{m: [] for m in args.methods}}
    for seed in seeds:
        t = time.perf_counter()
        ref = cached(cache_dir / f"{REFERENCE}-seed{seed}.json", args.fresh,
                     lambda seed=seed: run_reference(problem, seed, args.evals, work))
        if "best" not in ref:
            ref["best"] = engine_value(problem, ref["counts"], work)
            atomic_write_json(cache_dir / f"{REFERENCE}-seed{seed}.json", ref)
        results[REFERENCE].append(ref)
        log(f"[{problem['name']}] reference seed {seed}: {ref['best']:.5f} (naive {ref['best_naive']:.5f}) "
            f"{ref['counts']} in {ref['trace'][-1]['seconds']:.0f} s ({time.perf_counter() - t:.0f} s)")
        for row in args.methods:
            t = time.perf_counter()
            evals = args.default_evals if row == "ga" else args.evals
            res = cached(cache_dir / f"{row}-seed{seed}.json", args.fresh,
                         lambda row=row, seed=seed, evals=evals: run_allocopt(problem, row, seed, evals, work))
            results[row].append(res)
            log(f"[{problem['name']}] {row} seed {seed}: {res['best']:.5f} {res['counts']} ({res['equivalents']} "
                f"equivalents, {res['trace'][-1]['seconds']:.0f} s search, {time.perf_counter() - t:.0f} s)")
    return summarise(problem, results, long_run)


def summarise(problem: dict, results: dict[str, list[dict]], long_run: dict) -> dict:
    full = results[REFERENCE][0]["full_forward"]
    uniform = long_run["uniform"]
    best_known = max([long_run["best"]] + [r["best"] for rows in results.values() for r in rows])
    refs = results[REFERENCE]
    rows = []
    for row, runs in results.items():
        per_seed = []
        for ref, run in zip(refs, runs):
            wall, tokens = ref["trace"][-1]["seconds"], ref["trace"][-1]["layer_tokens"]
            hit = run["trace"][-1] if row == REFERENCE else first_reach(run["trace"], ref["best"])
            per_seed.append({
                "seed": run["seed"], "best": run["best"], "counts": run["counts"], "equivalents": run["equivalents"],
                "pruned": run.get("pruned", 0), "seconds": run["trace"][-1]["seconds"],
                "tokens_full": run["trace"][-1]["layer_tokens"] / full,
                "best_at_ref_wall": best_at(run["trace"], "seconds", wall),
                "best_at_ref_wall_10": best_at(run["trace"], "seconds", wall / 10),
                "best_at_ref_tokens_5": best_at(run["trace"], "layer_tokens", tokens / 5),
                "best_at_100_full": best_at(run["trace"], "layer_tokens", 100 * full),
                "best_at_300_evals": best_at(run["trace"], "equivalents", 300),
                "reach_ref_seconds": None if hit is None else hit["seconds"],
                "reach_ref_tokens_full": None if hit is None else hit["layer_tokens"] / full,
                "reach_ref_wall_ratio": None if hit is None else hit["seconds"] / wall,
                "reach_ref_tokens_ratio": None if hit is None else hit["layer_tokens"] / tokens,
                "ref_best": ref["best"], "ref_wall": wall, "ref_tokens_full": tokens / full,
            })
        def mean(k: str, per_seed: list[dict] = per_seed) -> float:
            return statistics.fmean(s[k] for s in per_seed)

        rows.append({"row": row, "seeds": per_seed,
                     **{k: mean(k) for k in ("best", "best_at_ref_wall", "best_at_ref_wall_10", "best_at_ref_tokens_5",
                                             "best_at_100_full", "best_at_300_evals", "equivalents", "seconds",
                                             "tokens_full")},
                     "gap_closed": gap(mean("best"), uniform, best_known),
                     "gap_closed_at_ref_wall": [gap(s["best_at_ref_wall"], uniform, best_known) for s in per_seed],
                     "gap_closed_at_100_full": [gap(s["best_at_100_full"], uniform, best_known) for s in per_seed]})
    return {"problem": problem, "uniform": uniform, "best_known": best_known, "best_known_run": {
                k: long_run[k] for k in ("best", "counts", "equivalents", "evaluations", "pruned")},
            "full_forward_layer_tokens": full, "rows": rows,
            "traces": {row: [r["trace"] for r in runs] for row, runs in results.items()}}


# ---- report ---------------------------------------------------------------------------------------------------

def _f(v: float | None, digits: int = 5) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    out = [f"# Search time-to-quality on {report['config'].get('model', 'testbed')} (benchmarks/search_efficiency.py)", "",
           f"`{cfg['command']}`", "",
           f"OMP_NUM_THREADS={cfg['omp_threads']}, torch threads {cfg['torch_threads']}, {cfg['cpus']} CPUs; other load on the "
           f"machine: {cfg.get('machine', 'not recorded')}; {cfg['date']}. Seeds {', '.join(map(str, cfg['seeds']))}; every row but `ga` (the default, "
           f"{cfg['default_evals']} equivalents) ran {cfg['evals']} evaluation equivalents. Costs count from the moment "
           "the evaluator is ready; tokens are decoder layer-tokens forwarded for candidates, in units of one full "
           "forward of the search set (\"full\"). W = the reference's wall-clock, T = its tokens (per seed). "
           f"Curves: `{report['config'].get('stem', 'search_efficiency')}.png`.", ""]
    for p in report["problems"]:
        prob = p["problem"]
        out += [f"## {prob['criterion']}, {prob['sparsity'] * 100:g}% sparsity", "",
                f"uniform {p['uniform']:.5f}; best-known {p['best_known']:.5f} "
                f"(long default run: {p['best_known_run']['best']:.5f} {p['best_known_run']['counts']}, "
                f"{p['best_known_run']['equivalents']:g} equivalents, {p['best_known_run']['evaluations']} full "
                f"evaluations + {p['best_known_run']['pruned']} pruned). Mean over seeds; gap = fraction of the "
                "uniform -> best-known gap closed.", "",
                "| row | best @ T/5 | best @ 100 full | best @ W/10 | best @ W | best @ 300 equiv | final best "
                "| gap closed (final) | equivalents | tokens / full | search s "
                "| reaches reference's best: s (x W), tokens (x T) per seed |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            reach = "; ".join("not reached" if s["reach_ref_seconds"] is None else
                              f"{s['reach_ref_seconds']:.1f} s ({s['reach_ref_wall_ratio']:.3f}), "
                              f"{s['reach_ref_tokens_full']:.1f} ({s['reach_ref_tokens_ratio']:.3f})" for s in r["seeds"])
            out.append(f"| {r['row']} | {_f(r['best_at_ref_tokens_5'])} | {_f(r['best_at_100_full'])} | "
                       f"{_f(r['best_at_ref_wall_10'])} | {_f(r['best_at_ref_wall'])} | {_f(r['best_at_300_evals'])} | "
                       f"{_f(r['best'])} | "
                       f"{_f(r['gap_closed'], 3)} | {r['equivalents']:.0f} | {r['tokens_full']:.0f} | {r['seconds']:.0f} | {reach} |")
        ref = next(r for r in p["rows"] if r["row"] == REFERENCE)
        out += ["", "Reference per seed: " + "; ".join(
            f"seed {s['seed']} best {s['best']:.5f} {s['counts']}, W {s['ref_wall']:.0f} s, T {s['ref_tokens_full']:.0f} full"
            for s in ref["seeds"]) + ".", ""]
        default = next((r for r in p["rows"] if r["row"] == "ga"), None)
        if default is not None:
            out += ["Default (`ga`) per seed, gap closed at W: " + ", ".join(_f(g, 4) for g in default["gap_closed_at_ref_wall"])
                    + "; at 100 full: " + ", ".join(_f(g, 4) for g in default["gap_closed_at_100_full"]) + ".", ""]
    return "\n".join(out) + "\n"


def figure(report: dict, path: Path) -> str:
    """Best ESAP (mean over seeds) against layer-tokens and against seconds, one panel pair per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = report["problems"]
    fig, axes = plt.subplots(len(problems), 2, figsize=(11, 4 * len(problems)), squeeze=False)
    for (ax_t, ax_s), p in zip(axes, problems):
        full = p["full_forward_layer_tokens"]
        for r in p["rows"]:
            runs = p["traces"][r["row"]]
            for ax, key, scale in ((ax_t, "layer_tokens", full), (ax_s, "seconds", 1.0)):
                grid = np.unique(np.concatenate([[q[key] / scale for q in t] for t in runs]))
                mean = np.mean([[best_at(t, key, g * scale) for g in grid] for t in runs], axis=0)
                ax.step(grid, mean, where="post", lw=2.2 if r["row"] in ("ga", REFERENCE) else 1.2, label=r["row"])
        for ax, label in ((ax_t, "layer-tokens forwarded / one full forward"), (ax_s, "wall-clock seconds")):
            ax.axhline(p["best_known"], ls=":", color="0.3", lw=1)
            ax.axhline(p["uniform"], ls="--", color="0.5", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("best ESAP (mean over seeds)")
            ax.set_ylim(p["uniform"] - 0.002, p["best_known"] + 0.002)
            ax.grid(alpha=0.3)
            ax.set_title(f"{p['problem']['criterion']}, {p['problem']['sparsity'] * 100:g}% sparsity", fontsize=10)
        ax_t.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=PROBLEMS, help="criterion:sparsity pairs, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS), help="allocopt rows (the reference always runs)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evals", type=int, default=D.EVALUATIONS, help="budget of the reference and every row but ga")
    ap.add_argument("--default-evals", type=int, default=900, help="budget of the default ga (covers the reference's W)")
    ap.add_argument("--best-known-evals", type=int, default=1500)
    ap.add_argument("--out", default=str(Path(D.STUDIES_DIR) / "reports"))
    ap.add_argument("--fresh", action="store_true", help="measure again even where a cached result exists")
    ap.add_argument("--model", default=D.MODEL, help="model spec [default: the testbed], e.g. testbed-deep")
    ap.add_argument("--data", default=None, help="calibration and search data [default: testbed:mix, deep:mix for "
                                                 "testbed-deep]")
    ap.add_argument("--machine", default="not recorded",
                    help="what else ran on the machine during the runs; the report says it (timings depend on it)")
    args = ap.parse_args(argv)
    data = args.data or default_data(args.model, D.SEARCH_DATA)
    stem = "search_efficiency" if args.model == D.MODEL else f"search_efficiency_{Path(args.model).name}"
    args.methods = [m for m in args.methods.split(",") if m]
    problems = []
    for item in args.problems.split(","):
        criterion, _, sparsity = item.partition(":")
        prefix = "" if args.model == D.MODEL else f"{Path(args.model).name}-"
        problems.append({"criterion": criterion, "sparsity": float(sparsity), "model": args.model, "data": data,
                         "name": f"{prefix}{criterion}-s{float(sparsity) * 100:g}"})
    out = Path(args.out)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / ".gitignore", "# studies and cached results of benchmarks/search_efficiency.py\n*\n")
    report = {"config": {"command": "python benchmarks/search_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                         "omp_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                         "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                         "seeds": [D.SEED + i for i in range(args.seeds)], "evals": args.evals,
                         "default_evals": args.default_evals, "best_known_evals": args.best_known_evals,
                         "model": args.model, "data": data, "stem": stem, "machine": args.machine},
              "problems": [measure(p, args, work) for p in problems]}
    report["figure"] = figure(report, out / f"{stem}.png")
    for p in report["problems"]:
        p.pop("traces")                          # the cached per-run results keep them; the report stays small
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_text(out / f"{stem}.md", markdown(report))
    log(f"wrote {out / stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
