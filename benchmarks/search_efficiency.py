"""How fast each optimizer finds good allocations at equal evaluation budgets (best value vs evaluations).

    python benchmarks/search_efficiency.py --model testbed --evals 300 --seeds 3        # real ESAP engine
    python benchmarks/search_efficiency.py --toy --evals 300 --seeds 3 --json            # toy score, no model

For each optimizer and seed: the best value after a few evaluation checkpoints, and the evaluations needed to
reach evoesap's final best on the same seed (the default optimizer should need <= 1/3 of evoesap's budget).
The model run uses the testbed at 50% sparsity, REAP ranking from one calibration pass, and the batched ESAP
Evaluator. Evaluation counts are distinct plans per optimizer run; the engine's own result cache is shared
across runs, so the wall-clock column favours optimizers that run later (compare evaluations, not seconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from allocopt import defaults
from allocopt.search.optimizers import SearchContext, get_optimizer
from allocopt.search.space import make_space

OPTIMIZERS = ["ga", "evoesap", "cmaes", "tpe", "random"]


def toy_problem(seed: int = 0):
    """24 layers x 64 experts (top-8) at 50% sparsity, like optimizers.md §4.3's toy."""
    from allocopt.search.toy import toy_objective

    space = make_space({l: 64 for l in range(24)}, {l: 8 for l in range(24)}, {l: 1 for l in range(24)},
                       sparsity=defaults.SPARSITY)
    return space, toy_objective(space, seed=seed), {}


def model_problem(model_spec: str, criterion: str):
    """The testbed (or any model spec) with the real ESAP engine; returns (space, evaluate, ranking)."""
    from allocopt.calibration import observe
    from allocopt.criteria import rank
    from allocopt.data import load_tokens
    from allocopt.models import describe, load_model
    from allocopt.objectives import Evaluator

    model, tokenizer = load_model(model_spec)
    info = describe(model)
    space = make_space(info.num_experts, info.top_k, info.bytes_per_expert, sparsity=defaults.SPARSITY)
    calib = load_tokens(defaults.CALIBRATION_DATA, tokenizer, defaults.CALIBRATION_SEQ_LEN, defaults.CALIBRATION_SEQS,
                        split="calibration")
    ranking = rank(observe(model, calib, progress=False), criterion)
    tokens = load_tokens(defaults.SEARCH_DATA, tokenizer, defaults.SEARCH_SEQ_LEN, defaults.SEARCH_SEQS, split="search")
    evaluator = Evaluator(model, tokens)

    def evaluate(X: np.ndarray) -> np.ndarray:
        plans = [{l: ranking[l][: int(c)] for l, c in zip(space.layers, row)} for row in X]
        return np.array([v.value if v.value is not None else np.nan for v in evaluator.evaluate(plans)], dtype=float)

    return space, evaluate, ranking


def best_curve(history) -> np.ndarray:
    return np.maximum.accumulate(np.array([v if np.isfinite(v) else -np.inf for _, v in history]))


def evals_to_reach(curve: np.ndarray, target: float) -> int | None:
    hit = np.flatnonzero(curve >= target - 1e-12)
    return int(hit[0]) + 1 if len(hit) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--toy", action="store_true", help="use the toy score instead of a model (no weights needed)")
    ap.add_argument("--evals", type=int, default=defaults.EVALUATIONS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--population", type=int, default=defaults.POPULATION)
    ap.add_argument("--criterion", default=defaults.CRITERION)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--toy-seed", type=int, default=0, help="which random toy instance (sensitivities)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    space, evaluate, ranking = toy_problem(args.toy_seed) if args.toy else model_problem(args.model, args.criterion)
    uniform = float(evaluate(space.uniform()[None])[0])
    names = args.optimizers.split(",")
    curves: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seconds: dict[str, float] = {n: 0.0 for n in names}
    for name in names:
        for seed in range(args.seeds):
            ctx = SearchContext(space, evaluate, seed, args.evals, args.population, ranking, {}, None)
            start = time.perf_counter()
            result = get_optimizer(name).run(ctx)
            seconds[name] += time.perf_counter() - start
            curves[name].append(best_curve(result.history))

    checkpoints = sorted({max(1, args.evals // 8), args.evals // 4, args.evals // 2, args.evals})
    targets = [c[-1] for c in curves["evoesap"]] if "evoesap" in curves else None
    rows = []
    for name in names:
        row = {"optimizer": name, "seconds": round(seconds[name], 2)}
        for cp in checkpoints:
            row[f"best@{cp}"] = statistics.mean(float(c[min(cp, len(c)) - 1]) for c in curves[name])
        if targets is not None:
            row["evals_to_evoesap_best"] = [evals_to_reach(c, t) for c, t in zip(curves[name], targets)]
        rows.append(row)
    report = {"problem": "toy" if args.toy else args.model, "layers": space.size, "budget": space.budget,
              "evals": args.evals, "seeds": args.seeds, "uniform": uniform, "rows": rows}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    print(f"{report['problem']}: {space.size} MoE layers, keep {space.budget}, uniform = {uniform:.5f}, "
          f"{args.seeds} seeds, mean best value")
    head = ["optimizer"] + [f"@{cp}" for cp in checkpoints] + ["evals to evoesap best (per seed)", "s"]
    print(" | ".join(head))
    for r in rows:
        reach = ", ".join("-" if e is None else str(e) for e in r.get("evals_to_evoesap_best", []))
        print(" | ".join([r["optimizer"]] + [f"{r[f'best@{cp}']:.5f}" for cp in checkpoints] + [reach, str(r["seconds"])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
