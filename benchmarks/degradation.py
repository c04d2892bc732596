"""How a testbed degrades under uniform pruning: held-out math EM, MC accuracy, code edit similarity and perplexity
at several sparsities for each of the six criteria, beside the full model (issue 22's must-show).

    python benchmarks/degradation.py --model testbed-deep --sparsity 0.125 0.25 0.5 [--limit N] [--out FILE.md]

Statistics come from one calibration pass on the testbed's ``mix`` calibration split (``allocopt.calibration.observe``);
each criterion ranks every layer's experts from them; "uniform" keeps the same number of experts in every MoE layer
(the first ``round(E * (1 - sparsity))`` of the ranking, at least top-k); every plan is scored with
``allocopt.evaluation.evaluate`` on the held-out split with the pruned experts masked (``mask_experts``), which gives
what the exported checkpoint gives. "kept" is the fraction of the full model's score a pruned model keeps.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CRITERIA = ("frequency", "ean", "seer", "reap", "man", "msan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed-deep")
    parser.add_argument("--tasks-from", dest="corpus", default=None, help="testbed or deep (default: by --model)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--limit", type=int, default=None, help="items per evaluation task")
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table (and .json beside it)")
    args = parser.parse_args()

    import torch
    import transformers

    from allocopt.calibration import observe
    from allocopt.config import shipped_corpus
    from allocopt.criteria import rank
    from allocopt.data import load_tokens
    from allocopt.evaluation import evaluate
    from allocopt.models import describe, mask_experts
    from allocopt.runtime import load_model

    corpus = args.corpus or shipped_corpus(args.model) or "testbed"
    source = "deep" if corpus == "deep" else "testbed"
    start = time.time()
    model, tokenizer = load_model(args.model)
    info = describe(model)
    tokens = load_tokens(f"{source}:mix", tokenizer, args.seq_len, args.calib_seqs, split="calibration")
    stats = observe(model, tokens, progress=False)
    full = evaluate(model, tokenizer, limit=args.limit, corpus=corpus)
    rows, results = [], {"full": full, "plans": {}}

    def row(name: str, m: dict) -> str:
        kept_em = m["math_em"] / full["math_em"] if full["math_em"] else float("nan")
        kept_mc = m["mc_acc"] / full["mc_acc"] if full["mc_acc"] else float("nan")
        return (f"| {name} | {m['math_em']:.3f} ({kept_em:.0%}) | {m['mc_acc']:.3f} ({kept_mc:.0%}) | "
                f"{m['code_edit_sim']:.3f} | {m['ppl']['math']:.2f} | {m['ppl']['code']:.2f} | {m['ppl']['prose']:.2f} |")

    rows.append(row("full", full))
    for sparsity in args.sparsity:
        for criterion in args.criteria:
            ranking = rank(stats, criterion)
            kept = {l: sorted(ranking[l][:max(info.top_k[l], round(n * (1 - sparsity)))])
                    for l, n in info.num_experts.items()}
            with mask_experts(model, kept):
                m = evaluate(model, tokenizer, limit=args.limit, corpus=corpus)
            name = f"{sparsity:.1%} {criterion}"
            results["plans"][name] = m
            rows.append(row(name, m))
            print(rows[-1], flush=True)
    text = "\n".join([
        f"`python benchmarks/degradation.py --model {args.model}{' --tasks-from ' + args.corpus if args.corpus else ''}"
        f" --sparsity {' '.join(map(str, args.sparsity))}"
        f"{' --criteria ' + ' '.join(args.criteria) if tuple(args.criteria) != CRITERIA else ''}"
        f"{' --limit ' + str(args.limit) if args.limit else ''}` ({time.time() - start:.0f} s; torch {torch.__version__}, "
        f"transformers {transformers.__version__}); uniform pruning, statistics from {args.calib_seqs} x {args.seq_len} "
        f"tokens of {source}:mix calibration; held-out tasks of the {corpus} corpus.", "",
        "| plan | math EM (kept) | MC acc (kept) | code edit sim | ppl math | ppl code | ppl prose |",
        "|---|---|---|---|---|---|---|", *rows])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
