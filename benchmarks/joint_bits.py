"""Experts and bit-widths together vs prune only, quantize only and uniform both, at equal bytes (issue #23).

    python benchmarks/joint_bits.py                                   # reap and frequency, 3 budgets, 3 seeds
    python benchmarks/joint_bits.py --criteria reap --ratios 0.25 --seeds 1 --evals 60 --limit 20 --out /tmp/jb

On the testbed (fp32 checkpoint), for each criterion and byte budget (``--ratios`` of the fp32 routed experts' bytes,
the rest of the checkpoint counted in full), every row spends the same evaluation budget of search-set ESAP:
* ``joint``: ``search.joint.joint_search`` over (kept count, bit-width) per layer, bit-widths fp32 / int8 / int4;
* ``prune only``: the same search with one bit-width for every layer (each of fp32, int8, int4; the best is shown);
* ``quantize only``: every expert kept, one bit-width for all (the most bits that fit);
* ``uniform both``: one count and one bit-width for every layer (the best such plan that fits).
Every plan is priced by ``export.size.ExportSize`` (what its export writes: packed int weights, their scales and
shapes, routers, everything else), and its held-out metrics (math EM, MC, perplexity per domain) are measured under
``mask_experts`` + ``quantize_experts``, the transforms ESAP scored. Searched rows: mean over seeds. Writes
``joint_bits.md``/``.json`` and ``joint_bits_front.png`` (ESAP against GiB: every feasible plan the joint searches
evaluated, their non-dominated front, the baselines as points).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from allocopt import defaults as D
from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_json, atomic_write_text

BITS = (None, 8, 4)
ROWS = ("joint", "prune only", "quantize only", "uniform both")
DOMAINS = ("prose", "code", "math")


def log(message: str) -> None:
    print(message, flush=True)


def _name(bits) -> str:
    return "fp32" if bits is None else f"int{bits}"


def plan_key(js, x) -> str:
    counts, bits = js.split(x)
    return " ".join(f"{int(c)}@{_name(js.bits[int(b)])}" for c, b in zip(counts, bits))


def heldout(model, tokenizer, plan, limit, cache: dict) -> dict:
    from allocopt.evaluation import evaluate
    from allocopt.models import mask_experts
    from allocopt.models.quantization import quantize_experts

    key = json.dumps({"kept": {str(l): list(k) for l, k in plan.kept.items()}, "bits": plan.bits, "limit": limit})
    if key not in cache:
        with mask_experts(model, plan.kept), quantize_experts(model, plan.bits):
            cache[key] = evaluate(model, tokenizer, limit=limit)
    return cache[key]


def run(argv: list[str] | None = None) -> dict:
    from allocopt.config import RunConfig
    from allocopt.export.size import export_size
    from allocopt.pipeline.prepare import prepare
    from allocopt.search.joint import joint_search, make_joint_space

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criteria", default="reap,frequency")
    ap.add_argument("--ratios", default="0.5,0.35,0.25", help="byte budgets: fractions of the fp32 routed experts' bytes")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evals", type=int, default=150, help="search-set evaluations of every searched row")
    ap.add_argument("--limit", type=int, default=100, help="held-out items per task")
    ap.add_argument("--out", default=str(Path(D.STUDIES_DIR) / "reports"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = out / "joint_bits"
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / ".gitignore", "*\n")
    cache_file = work / "heldout.json"
    held = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    seeds = [D.SEED + i for i in range(args.seeds)]
    report = {"config": {"command": "python benchmarks/joint_bits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                         "seeds": seeds, "evals": args.evals, "limit": args.limit, "date": time.strftime("%Y-%m-%d")},
              "problems": []}
    start = time.perf_counter()
    for criterion in args.criteria.split(","):
        config = RunConfig.from_sources(None, {"criterion": criterion, "sparsity": 0.5, "out": str(work / criterion),
                                               "run_name": criterion})
        p = prepare(config, progress=False)
        if "full" not in report:
            report["full"] = heldout(p.model, p.tokenizer, _identity(p), args.limit, held)
        size = export_size(p.model, bits=tuple(b for b in BITS if b is not None))
        expert_bytes = sum(n * size.per_expert[l] for l, n in size.num_experts.items())

        def evaluator(js, p=p):
            def evaluate(X):
                plans = [js.plan(x, p.info.fingerprint, p.ranking) for x in np.atleast_2d(X)]
                return np.array([v.value if v.ok else np.nan for v in p.evaluator.evaluate(plans)])
            return evaluate

        for ratio in (float(r) for r in args.ratios.split(",")):
            budget = size.full - expert_bytes + int(ratio * expert_bytes)
            problem = {"criterion": criterion, "ratio": ratio, "budget_bytes": budget, "full_bytes": size.full,
                       "rows": [], "evaluated": []}
            joint = make_joint_space(p.space, BITS, size.expert_bytes, size.base, budget)
            rows = []
            for seed in seeds:
                t = time.perf_counter()
                best, value, cache = joint_search(evaluator(joint), joint, args.evals, seed)
                rows.append(("joint", seed, joint, best, value, time.perf_counter() - t))
                problem["evaluated"] += [(float(joint.bytes(x)), float(v)) for x, v in cache.history
                                         if np.isfinite(v) and joint.contains(x)]
                single = []
                for b in BITS:
                    try:
                        one = make_joint_space(p.space, (b,), size.expert_bytes, size.base, budget)
                    except AllocoptError:
                        continue
                    t = time.perf_counter()
                    sb, sv, _ = joint_search(evaluator(one), one, args.evals, seed)
                    single.append((sv, one, sb, time.perf_counter() - t))
                sv, one, sb, secs = max(single, key=lambda s: s[0])
                rows.append(("prune only", seed, one, sb, sv, secs))
            quant = [x for x in joint.uniform_both() if np.all(joint.split(x)[0] == p.space.num_experts)]
            for kind, candidates in (("quantize only", quant), ("uniform both", joint.uniform_both())):
                if not candidates:
                    continue
                values = evaluator(joint)(np.array(candidates))
                i = int(np.nanargmax(values))
                rows.append((kind, None, joint, candidates[i], float(values[i]), 0.0))
            for kind, seed, js, x, value, secs in rows:
                plan = js.plan(x, p.info.fingerprint, p.ranking)
                h = heldout(p.model, p.tokenizer, plan, args.limit, held)
                atomic_write_json(cache_file, held)
                problem["rows"].append({"row": kind, "seed": seed, "esap": value, "bytes": int(js.bytes(x)),
                                        "plan": plan_key(js, x), "math_em": h["math_em"], "mc_acc": h["mc_acc"],
                                        "ppl": {d: h["ppl"][d] for d in DOMAINS}, "search_s": round(secs, 1)})
                log(f"{criterion} {ratio:g} {kind} seed {seed}: ESAP {value:.5f} bytes {int(js.bytes(x))} "
                    f"({plan_key(js, x)}) math {100 * h['math_em']:.1f} MC {100 * h['mc_acc']:.1f}")
            report["problems"].append(problem)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["figure"] = figure(report, out / "joint_bits_front.png")
    for p_ in report["problems"]:
        p_["front"] = _front(p_.pop("evaluated"))
    atomic_write_json(out / "joint_bits.json", report)
    atomic_write_text(out / "joint_bits.md", markdown(report))
    log(f"wrote {out / 'joint_bits.md'}")
    return report


def _identity(p):
    from allocopt.plan import Plan

    return Plan.identity(p.info.fingerprint, p.space.as_dict(p.space.num_experts))


def _front(points) -> list[tuple[float, float]]:
    """Non-dominated (bytes, ESAP) points: fewer bytes and higher ESAP are better."""
    out, best = [], -np.inf
    for b, v in sorted(set(points)):
        if v > best:
            out.append((b, v))
            best = v
    return out


def summarise(problem: dict) -> list[dict]:
    out = []
    for kind in ROWS:
        rows = [r for r in problem["rows"] if r["row"] == kind]
        if not rows:
            continue
        mean = lambda key, rows=rows: statistics.fmean(r[key] for r in rows)          # noqa: E731
        out.append({"row": kind, "n": len(rows), "esap": mean("esap"), "esap_min": min(r["esap"] for r in rows),
                    "bytes": mean("bytes"), "math_em": mean("math_em"), "mc_acc": mean("mc_acc"),
                    "ppl": {d: statistics.fmean(r["ppl"][d] for r in rows) for d in DOMAINS},
                    "plans": sorted({r["plan"] for r in rows})})
    return out


def markdown(report: dict) -> str:
    full = report["full"]
    lines = ["# Experts and bit-widths under one byte budget (benchmarks/joint_bits.py)", "",
             f"`{report['config']['command']}`; seeds {report['config']['seeds']}, {report['config']['evals']} "
             f"search-set evaluations per searched row, held-out limit {report['config']['limit']}; "
             f"{report['wall_seconds']:.0f} s in all.", "",
             f"Full model (fp32): math EM {100 * full['math_em']:.1f}, MC {100 * full['mc_acc']:.1f}, perplexity "
             + ", ".join(f"{d} {full['ppl'][d]:.3f}" for d in DOMAINS) + ".", ""]
    for p in report["problems"]:
        lines += [f"## {p['criterion']}, budget {100 * p['ratio']:g}% of the fp32 expert bytes "
                  f"({p['budget_bytes'] / 2**20:.2f} MiB of {p['full_bytes'] / 2**20:.2f} MiB)", "",
                  "| row | runs | ESAP (mean) | ESAP (worst seed) | MiB | math EM | MC | ppl prose / code / math | plan(s): count@bits per layer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in summarise(p):
            lines.append(f"| {r['row']} | {r['n']} | {r['esap']:.5f} | {r['esap_min']:.5f} | {r['bytes'] / 2**20:.3f} | "
                         f"{100 * r['math_em']:.1f} | {100 * r['mc_acc']:.1f} | "
                         + " / ".join(f"{r['ppl'][d]:.3f}" for d in DOMAINS) + " | " + "; ".join(r["plans"]) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(report: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = sorted({p["criterion"] for p in report["problems"]})
    fig, axes = plt.subplots(1, len(criteria), figsize=(6 * len(criteria), 4.5), squeeze=False)
    marks = {"prune only": "s", "quantize only": "^", "uniform both": "D"}
    for ax, criterion in zip(axes[0], criteria):
        problems = [p for p in report["problems"] if p["criterion"] == criterion]
        points = [pt for p in problems for pt in p["evaluated"]]
        if points:
            b, v = np.array(points).T
            ax.scatter(b / 2**30, v, s=6, color="0.75", label="joint: evaluated plans")
            f = np.array(_front(points))
            ax.step(f[:, 0] / 2**30, f[:, 1], where="post", color="C0", lw=2, label="joint: front")
        for kind, m in marks.items():
            rows = [r for p in problems for r in p["rows"] if r["row"] == kind]
            if rows:
                ax.scatter([r["bytes"] / 2**30 for r in rows], [r["esap"] for r in rows], marker=m, s=40, label=kind)
        for p in problems:
            ax.axvline(p["budget_bytes"] / 2**30, ls=":", color="0.5", lw=1)
        ax.set_xlabel("export size (GiB)")
        ax.set_ylabel("ESAP (search set)")
        ax.set_title(criterion)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    try:
        run()
    except AllocoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
