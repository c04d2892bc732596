"""What each part of the default search costs, per MoE layer: the sensitivity-DP warm start against the GA generations.

    python benchmarks/warm_start_cost.py --problems problems/testbed-50.toml problems/testbed-25.toml --seeds 42 43 44
    python benchmarks/warm_start_cost.py --problems problems/testbed-deep-50.toml --seeds 42 --out FILE.md
    python benchmarks/warm_start_cost.py --problems problems/testbed-deep-50.toml --evals 75 --variants auto dp_rows=4

``--evals`` below the default puts a shallow model in a deep one's budget per layer (300 evaluations over 48 MoE
layers is 75 over the deep testbed's 12); ``--variants`` runs each problem and seed once per option set (``auto``:
the defaults; ``dp_rows=4``: probes scored on the first 4 of the 16 search rows, so the warm start's share pays for
more of them).

Each run is ``allocopt run`` with the problem file's settings (the default ``ga``, a fresh SQLite study under a
temporary folder); its plan.json records ``search_phases`` (``EvaluationCache.phase``: evaluation equivalents, plans at
full fidelity and seconds charged to the uniform plan, the DP warm start, the GA generations and DP restarts). The
table gives each part's share of the search and the warm start per MoE layer: the number that decides whether the
warm start scales to 48-94 layers within the ``--evals`` budget (it is capped at ``GA_DP_BUDGET_SHARE`` of it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def run_one(problem: Path, seed: int, evals: int | None, variant: str, work: Path) -> dict:
    from allocopt.config import RunConfig
    from allocopt.pipeline import run_search

    name = f"{problem.stem}-{seed}-{len(list(work.iterdir()))}"
    given = {"seed": seed, "out": str(work / name), "run_name": name}
    if evals is not None:
        given["evals"] = evals
    if variant != "auto":
        given["options"] = dict(kv.split("=", 1) for kv in variant.split(","))
    config = RunConfig.from_sources(problem, given)
    start = time.perf_counter()
    result = run_search(config, progress=False)
    plan = json.loads(Path(result.plan_path).read_text())
    return {"problem": problem.stem, "variant": variant, "seed": seed, "layers": len(plan["layers"]),
            "evals": config.max_evals, "phases": plan["search_phases"], "seconds": time.perf_counter() - start, "esap": plan["esap"],
            "uniform_esap": plan["uniform_esap"]}


def table(runs: list[dict]) -> str:
    lines = ["| problem | variant | layers | --evals | seeds | part | equivalents (share) | plans | seconds (share) | "
             "per layer: equivalents / seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for problem, variant in dict.fromkeys((r["problem"], r["variant"]) for r in runs):
        group = [r for r in runs if (r["problem"], r["variant"]) == (problem, variant)]
        layers, evals = group[0]["layers"], group[0]["evals"]
        parts = list(dict.fromkeys(p for r in group for p in r["phases"]))
        total_eq = statistics.fmean(sum(p["equivalents"] for p in r["phases"].values()) for r in group)
        total_s = statistics.fmean(sum(p["seconds"] for p in r["phases"].values()) for r in group)
        for part in parts:
            eq = statistics.fmean(r["phases"].get(part, {}).get("equivalents", 0.0) for r in group)
            plans = statistics.fmean(r["phases"].get(part, {}).get("evaluations", 0) for r in group)
            sec = statistics.fmean(r["phases"].get(part, {}).get("seconds", 0.0) for r in group)
            per = f"{eq / layers:.2f} / {sec / layers:.2f}" if part.startswith("dp") else ""
            lines.append(f"| {problem} | {variant} | {layers} | {evals} | {len(group)} | {part} | {eq:.1f} ({eq / total_eq:.0%}) | "
                         f"{plans:.1f} | {sec:.1f} ({sec / total_s:.0%}) | {per} |")
    lines += ["", "| problem | variant | seed | uniform | best | gap to the best of any variant closed | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        top = max(o["esap"] for o in runs if (o["problem"], o["seed"]) == (r["problem"], r["seed"]))
        closed = (r["esap"] - r["uniform_esap"]) / (top - r["uniform_esap"]) if top > r["uniform_esap"] else 1.0
        lines.append(f"| {r['problem']} | {r['variant']} | {r['seed']} | {r['uniform_esap']:.5f} | {r['esap']:.5f} | "
                     f"{closed:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=Path, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--evals", type=int, default=None, help="default: the problem file's")
    parser.add_argument("--variants", nargs="+", default=["auto"],
                        help="option sets, each 'auto' (the defaults) or KEY=VALUE[,KEY=VALUE] (--option of ga)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (and .json beside it)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        for problem in args.problems:
            for seed in args.seeds:
                for variant in args.variants:
                    runs.append(run_one(problem, seed, args.evals, variant, Path(tmp)))
                    r = runs[-1]
                    print(f"{r['problem']} {variant} seed {seed}: {r['seconds']:.0f} s, ESAP {r['esap']:.5f} "
                          f"(uniform {r['uniform_esap']:.5f}), {json.dumps(r['phases'])}", flush=True)
    text = table(runs)
    print(text)
    if args.out is not None:
        from allocopt.io import atomic_write_json, atomic_write_text

        atomic_write_text(args.out, text + "\n")
        atomic_write_json(args.out.with_suffix(".json"), runs)


if __name__ == "__main__":
    main()
