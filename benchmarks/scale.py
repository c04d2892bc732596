"""Peak memory and time of observe, esap and prune on OLMoE-1B-7B-shaped models, in memory and under a limit.

    python benchmarks/scale.py --layers 2 4 8 --out studies/reports/scale.md

For each layer count it writes a random bf16 checkpoint with OLMoE-1B-7B's layer shapes (scale_model.py), then runs
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

from scale_model import write_checkpoint  # noqa: E402

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def measure(args: list[str]) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, stdout) of one fresh ``allocopt`` process, via /usr/bin/time -v when present."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    proc = subprocess.run([time_bin, "-v", sys.executable, "-m", "allocopt.cli.main", *args], capture_output=True,
                          text=True, env=ENV)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"allocopt {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak_kb = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line)
    return peak_kb / 1024, seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--limit", default="600MiB", help="--max-memory cpu=LIMIT for the limited runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/allocopt-scale"))
    parser.add_argument("--calib-seqs", type=int, default=8)
    parser.add_argument("--search-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from allocopt.calibration import RoutingStats

    rows, results = [], {}
    for layers in args.layers:
        ckpt = args.work / f"olmoe-{layers}l"
        if not (ckpt / "config.json").exists():
            write_checkpoint(ckpt, layers)
        weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        limit = ["--max-memory", f"cpu={args.limit}", "--offload-dir", str(args.work / f"offload-{layers}")]
        plan_path = args.work / f"plan-{layers}.json"
        result: dict[str, dict[str, float]] = {}
        for mode, extra in (("memory", ["--device", "cpu"]), ("limit", limit)):
            shutil.rmtree(args.work / f"offload-{layers}", ignore_errors=True)
            stats = args.work / f"stats-{layers}-{mode}.safetensors"
            peak, sec, _ = measure(["observe", "--model", str(ckpt), "--data", "testbed:mix", "--seq-len", str(args.seq_len),
                                    "--num-seqs", str(args.calib_seqs), "--out", str(stats), "--no-progress", *extra])
            result[f"observe/{mode}"] = {"rss": peak, "s": sec, "tokens": args.calib_seqs * args.seq_len}
            if not plan_path.exists():
                _write_half_plan(ckpt, stats, plan_path)
            peak, sec, out = measure(["esap", "--model", str(ckpt), "--plan", str(plan_path), "--data", "testbed:mix",
                                      "--seq-len", str(args.seq_len), "--num-seqs", str(args.search_seqs), "--json", *extra])
            result[f"esap/{mode}"] = {"rss": peak, "s": sec, "tokens": 2 * args.search_seqs * args.seq_len,
                                      "esap": json.loads(out.strip().splitlines()[-1])["esap"]}
            export = args.work / f"pruned-{layers}-{mode}"
            shutil.rmtree(export, ignore_errors=True)
            peak, sec, _ = measure(["prune", "--plan", str(plan_path), "--model", str(ckpt), "--out", str(export), "--quiet",
                                    *extra])
            result[f"prune/{mode}"] = {"rss": peak, "s": sec, "tokens": 0}
        a = RoutingStats.load(args.work / f"stats-{layers}-memory.safetensors")
        b = RoutingStats.load(args.work / f"stats-{layers}-limit.safetensors")
        stats_rel = max(float(((a.gate_norm_sum[l] - b.gate_norm_sum[l]).abs() / a.gate_norm_sum[l].abs().clamp(min=1e-12)).max())
                        for l in a.layers)
        esap_diff = abs(result["esap/memory"]["esap"] - result["esap/limit"]["esap"])
        ta = {k: v for f in (args.work / f"pruned-{layers}-memory").glob("*.safetensors") for k, v in load_file(f).items()}
        tb = {k: v for f in (args.work / f"pruned-{layers}-limit").glob("*.safetensors") for k, v in load_file(f).items()}
        same_export = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        results[layers] = {"weights_mib": weights, "stages": result, "stats_max_rel_diff": stats_rel,
                           "esap_diff": esap_diff, "export_identical": same_export}
        for stage, r in result.items():
            per_k = r["s"] / r["tokens"] * 1000 if r["tokens"] else float("nan")
            rows.append(f"| {layers} | {weights:.0f} | {stage} | {r['rss']:.0f} | {r['s']:.1f} | {per_k:.2f} |")
        print(f"{layers} layers: stats max rel diff {stats_rel:.2e}, ESAP diff {esap_diff:.2e}, export identical {same_export}",
              flush=True)
    lines = ["| layers | weights MiB | stage/mode | peak RSS MiB | seconds | s per 1k tokens |", "|---|---|---|---|---|---|", *rows]
    if len(args.layers) >= 2:
        lo, hi = min(args.layers), max(args.layers)
        lines += ["", "Growth per added layer (from the smallest to the largest model):", ""]
        for stage in results[lo]["stages"]:
            d_rss = (results[hi]["stages"][stage]["rss"] - results[lo]["stages"][stage]["rss"]) / (hi - lo)
            d_s = (results[hi]["stages"][stage]["s"] - results[lo]["stages"][stage]["s"]) / (hi - lo)
            lines.append(f"- {stage}: {d_rss:+.0f} MiB and {d_s:+.1f} s per layer")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        args.out.write_text(text + "\n")


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
