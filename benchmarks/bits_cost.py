"""What scoring a plan costs with bit-widths on vs off (issue #23): the quantized levels are computed once per
(layer, bit-width), not per candidate.

    python benchmarks/bits_cost.py                     # the testbed, 48 plans each way
    python benchmarks/bits_cost.py --plans 24 --model testbed-deep --data deep:mix

One engine scores the same random plans (each layer a random count between top-k and all experts) twice, in two
orders of work measured in one run: ``off`` (kept sets only) and ``on`` (the same kept sets, each layer at a random one
of the checkpoint's precision, int8, int4). Printed: seconds per plan each way and their ratio, the time spent
quantizing (``quantize_matrix`` calls and seconds: once per layer and bit-width used) and the decoder layer-tokens
forwarded per plan (prefix reuse keys on kept set and bits, so bits cut shared prefixes shorter).
"""
from __future__ import annotations

import argparse
import random
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from allocopt.data import load_tokens
    from allocopt.models import describe
    from allocopt.models import quantization as Q
    from allocopt.objectives import Evaluator
    from allocopt.plan import Plan
    from allocopt.runtime import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--data", default="testbed:mix")
    ap.add_argument("--plans", type=int, default=48)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model)
    info = describe(model)
    tokens = load_tokens(args.data, tokenizer, 256, args.rows, split="search")
    rng = random.Random(args.seed)
    ranking = {l.index: list(range(l.num_experts)) for l in info.layers}
    plans_off, plans_on = [], []
    for _ in range(args.plans):
        ids = {l.index: sorted(rng.sample(range(l.num_experts), rng.randint(max(l.top_k, l.min_kept), l.num_experts)))
               for l in info.layers}
        bits = {l.index: b for l in info.layers if (b := rng.choice((None, 8, 4))) is not None}
        counts = {l: len(k) for l, k in ids.items()}
        rank = {l: ids[l] + [e for e in ranking[l] if e not in ids[l]] for l in ids}
        plans_off.append(Plan.from_counts(info.fingerprint, rank, info.num_experts, counts))
        plans_on.append(Plan.from_counts(info.fingerprint, rank, info.num_experts, counts, bits))

    calls = {"n": 0, "s": 0.0}
    real = Q.quantize_matrix

    def counted(*a, **k):
        start = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            calls["n"] += 1
            calls["s"] += time.perf_counter() - start

    Q.quantize_matrix = counted
    results = {}
    for name, plans in (("off", plans_off), ("on", plans_on), ("off again", plans_off)):
        ev = Evaluator(model, tokens)                       # a fresh engine each: no result or prefix cache carried over
        Q.clear_levels(model)
        calls.update(n=0, s=0.0)
        start = time.perf_counter()
        ev.evaluate(plans)
        seconds = time.perf_counter() - start
        results[name] = seconds
        print(f"bits {name:<9}: {seconds / len(plans) * 1000:7.1f} ms per plan over {len(plans)} plans; "
              f"layer-tokens per plan {ev.counters['layer_tokens'] / len(plans):,.0f}; quantize_matrix calls "
              f"{calls['n']} ({calls['s']:.2f} s)")
    base = (results["off"] + results["off again"]) / 2
    print(f"ratio on / off: {results['on'] / base:.2f} (off = mean of the two off runs around it; torch threads "
          f"{torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
