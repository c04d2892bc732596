"""Peak memory and time of observe, esap and prune on OLMoE-1B-7B-shaped models, in memory and under a limit.

    python benchmarks/scale.py --layers 2 4 8 --out studies/reports/scale.md

For each layer count and checkpoint layout (``--layouts``: ``per-expert``, the layout ``save_pretrained`` and the
published checkpoints use, and ``fused``, transformers' in-memory one) it writes a random bf16 checkpoint with
OLMoE-1B-7B's layer shapes (scale_model.py), then runs
the real CLI in a fresh process per (stage, mode) and reads that process's peak RSS (``ru_maxrss`` of the child):
``allocopt observe`` (calibration), ``allocopt esap`` (teacher + one plan, prefix reuse on) and ``allocopt prune``,
each in memory (``--device cpu``) and under ``--max-memory cpu=LIMIT --offload-dir DIR``. It checks that the limited
runs give the same results (statistics within relative 1e-3, ESAP within 1e-4, an identical export) and prints a
markdown table: peak RSS, seconds, seconds per 1k tokens, and how each grows per added layer.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_model import LAYOUTS, write_checkpoint  # noqa: E402

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def measure(args: list[str], python: list[str] | None = None) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, stdout) of one fresh ``allocopt`` process (or ``python ARGS``), via /usr/bin/time -v."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    command = [sys.executable, *python] if python is not None else [sys.executable, "-m", "allocopt.cli.main", *args]
    proc = subprocess.run([time_bin, "-v", *command], capture_output=True, text=True, env=ENV)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    peak_kb = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line)
    return peak_kb / 1024, seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--limit", default="600MiB", help="--max-memory cpu=LIMIT for the limited runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/allocopt-scale"))
    parser.add_argument("--calib-seqs", type=int, default=8)
    parser.add_argument("--search-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--population", type=int, default=8, help="plans in the generation scored under the limit (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from allocopt.calibration import RoutingStats

    rows, pop_rows, results = [], [], {}
    for layout, layers in [(layout, layers) for layout in args.layouts for layers in args.layers]:
        ckpt = args.work / f"olmoe-{layout}-{layers}l"
        if not (ckpt / "config.json").exists():
            write_checkpoint(ckpt, layers, layout=layout)
        weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        limit = ["--max-memory", f"cpu={args.limit}", "--offload-dir", str(args.work / f"offload-{layout}-{layers}")]
        plan_path = args.work / f"plan-{layout}-{layers}.json"
        result: dict[str, dict[str, float]] = {}
        for mode, extra in (("memory", ["--device", "cpu"]), ("limit", limit)):
            shutil.rmtree(args.work / f"offload-{layout}-{layers}", ignore_errors=True)
            stats = args.work / f"stats-{layout}-{layers}-{mode}.safetensors"
            peak, sec, _ = measure(["observe", "--model", str(ckpt), "--data", "testbed:mix", "--seq-len", str(args.seq_len),
                                    "--num-seqs", str(args.calib_seqs), "--out", str(stats), "--no-progress", *extra])
            result[f"observe/{mode}"] = {"rss": peak, "s": sec, "tokens": args.calib_seqs * args.seq_len}
            if not plan_path.exists():
                _write_half_plan(ckpt, stats, plan_path)
            peak, sec, out = measure(["esap", "--model", str(ckpt), "--plan", str(plan_path), "--data", "testbed:mix",
                                      "--seq-len", str(args.seq_len), "--num-seqs", str(args.search_seqs), "--json", *extra])
            result[f"esap/{mode}"] = {"rss": peak, "s": sec, "tokens": 2 * args.search_seqs * args.seq_len,
                                      "esap": json.loads(out.strip().splitlines()[-1])["esap"]}
            export = args.work / f"pruned-{layout}-{layers}-{mode}"
            shutil.rmtree(export, ignore_errors=True)
            peak, sec, _ = measure(["prune", "--plan", str(plan_path), "--model", str(ckpt), "--out", str(export), "--quiet",
                                    *extra])
            result[f"prune/{mode}"] = {"rss": peak, "s": sec, "tokens": 0}
        if args.population:
            pop = population(ckpt, args.limit, args.work / f"offload-{layout}-{layers}", args.work / f"stats-{layout}-{layers}-memory.safetensors",
                             args.population, args.seq_len, args.search_seqs)
            diff = max(abs(a - b) for a, b in zip(pop["layerwise"]["values"], pop["per-plan"]["values"]))
            speed = pop["per-plan"]["seconds"] / pop["layerwise"]["seconds"]
            pop_rows.append(f"| {layout} | {layers} | {args.population} | {pop['per-plan']['seconds']:.1f} | {pop['per-plan']['rss']:.0f} "
                            f"| {pop['layerwise']['seconds']:.1f} | {pop['layerwise']['rss']:.0f} | {speed:.2f}x | {diff:.1e} |")
        a = RoutingStats.load(args.work / f"stats-{layout}-{layers}-memory.safetensors")
        b = RoutingStats.load(args.work / f"stats-{layout}-{layers}-limit.safetensors")
        stats_rel = max(float(((a.gate_norm_sum[l] - b.gate_norm_sum[l]).abs() / a.gate_norm_sum[l].abs().clamp(min=1e-12)).max())
                        for l in a.layers)
        esap_diff = abs(result["esap/memory"]["esap"] - result["esap/limit"]["esap"])
        ta = {k: v for f in (args.work / f"pruned-{layout}-{layers}-memory").glob("*.safetensors") for k, v in load_file(f).items()}
        tb = {k: v for f in (args.work / f"pruned-{layout}-{layers}-limit").glob("*.safetensors") for k, v in load_file(f).items()}
        same_export = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        results[f"{layout}/{layers}"] = {"layout": layout, "layers": layers, "weights_mib": weights, "stages": result, "stats_max_rel_diff": stats_rel,
                           "esap_diff": esap_diff, "export_identical": same_export}
        for stage, r in result.items():
            per_k = r["s"] / r["tokens"] * 1000 if r["tokens"] else float("nan")
            rows.append(f"| {layout} | {layers} | {weights:.0f} | {stage} | {r['rss']:.0f} | {r['s']:.1f} | {per_k:.2f} |")
        print(f"{layout}, {layers} layers: stats max rel diff {stats_rel:.2e}, ESAP diff {esap_diff:.2e}, export identical {same_export}",
              flush=True)
    lines = ["| layout | layers | weights MiB | stage/mode | peak RSS MiB | seconds | s per 1k tokens |",
             "|---|---|---|---|---|---|---|", *rows]
    if len(args.layers) >= 2:
        lo, hi = min(args.layers), max(args.layers)
        lines += ["", "Growth per added layer (from the smallest to the largest model):", ""]
        for layout in args.layouts:
            for stage in results[f"{layout}/{lo}"]["stages"]:
                d_rss = (results[f"{layout}/{hi}"]["stages"][stage]["rss"] - results[f"{layout}/{lo}"]["stages"][stage]["rss"])
                d_s = results[f"{layout}/{hi}"]["stages"][stage]["s"] - results[f"{layout}/{lo}"]["stages"][stage]["s"]
                lines.append(f"- {layout} {stage}: {d_rss / (hi - lo):+.0f} MiB and {d_s / (hi - lo):+.1f} s per layer")
    if pop_rows:
        lines += ["", f"A generation scored under cpu={args.limit} (evaluate only, teacher excluded): plan by plan vs layer by "
                      "layer (objectives.layerwise)", "",
                  "| layout | layers | plans | per-plan s | per-plan peak RSS MiB | layerwise s | layerwise peak RSS MiB | speed-up | "
                  "max ESAP diff |", "|---|---|---|---|---|---|---|---|---|", *pop_rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        args.out.write_text(text + "\n")


POPULATION = """
import json, sys, time
import numpy as np
from allocopt.criteria import rank
from allocopt.calibration import RoutingStats
from allocopt.data import load_tokens
from allocopt.models import describe
from allocopt.runtime import load_model
from allocopt.runtime.loading import LoadOptions
from allocopt.objectives import Evaluator
from allocopt.search.mutation import level_switch
ckpt, limit, offload, stats, plans, seq_len, seqs, layerwise = sys.argv[1:9]
model, tok = load_model(ckpt, LoadOptions(device="cpu", max_memory={"cpu": limit}, offload_dir=offload))
ranking = rank(RoutingStats.load(stats), "reap")
info = describe(model)
layers = sorted(info.num_experts)
lower = np.array([info.top_k[l] for l in layers]); upper = np.array([info.num_experts[l] for l in layers])
uniform = upper // 2
rng = np.random.default_rng(0)
counts = [uniform] + [level_switch(uniform, lower, upper, rng, tmax=2, dmax=8) for _ in range(int(plans) - 1)]
population = [{l: ranking[l][:int(c)] for l, c in zip(layers, x)} for x in counts]
ev = Evaluator(model, load_tokens("testbed:mix", tok, int(seq_len), int(seqs), split="search"), layerwise=layerwise == "1")
start = time.perf_counter()
values = [v.value for v in ev.evaluate(population)]
print(json.dumps({"seconds": time.perf_counter() - start, "values": values, "layerwise": ev.layerwise}))
"""


def population(ckpt: Path, limit: str, offload: Path, stats: Path, plans: int, seq_len: int, seqs: int) -> dict:
    """One generation of ``plans`` plans (uniform + level-switch neighbours) scored under the memory limit, layer by
    layer and plan by plan, each in a fresh process: peak RSS, seconds of ``evaluate`` alone, values."""
    out = {}
    for mode, flag in (("layerwise", "1"), ("per-plan", "0")):
        shutil.rmtree(offload, ignore_errors=True)
        peak, _, stdout = measure([], python=["-c", POPULATION, str(ckpt), limit, str(offload), str(stats), str(plans),
                                              str(seq_len), str(seqs), flag])
        out[mode] = {"rss": peak, **json.loads(stdout.strip().splitlines()[-1])}
    return out


def _write_half_plan(ckpt: Path, stats_path: Path, plan_path: Path) -> None:
    """A non-uniform 50% plan from the statistics (REAP ranking; layers alternate 3/4 and 1/4 of the experts)."""
    import transformers

    from allocopt.calibration import RoutingStats
    from allocopt.criteria import rank
    from allocopt.plan import Plan

    stats = RoutingStats.load(stats_path)
    ranking = rank(stats, "reap")
    config = transformers.AutoConfig.from_pretrained(ckpt)
    e = config.num_experts
    counts = {l: (3 * e // 4 if i % 2 == 0 else e // 4) for i, l in enumerate(stats.layers)}
    plan = Plan.from_counts(stats.model_fingerprint, ranking, {l: e for l in stats.layers}, counts, model=str(ckpt))
    plan.save(plan_path)


if __name__ == "__main__":
    main()
