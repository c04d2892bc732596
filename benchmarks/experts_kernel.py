"""Which transformers fused-experts kernel to use per device: forward time of each on the same batch.

transformers 5 runs fused 3D experts through ``grouped_mm`` unless told otherwise; on CPU its fallback is
several times slower than the ``eager`` per-expert loop. ``allocopt.runtime.load_model`` picks the kernel from
``defaults.EXPERTS_IMPLEMENTATION``; this script is the measurement behind that choice.

    python benchmarks/experts_kernel.py [--model testbed] [--device cpu] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from allocopt import defaults
from allocopt.data import load_tokens
from allocopt.runtime import load_model

KERNELS = ("grouped_mm", "batched_mm", "eager")


@torch.inference_mode()
def time_forward(model, tokens, repeats: int) -> tuple[float, torch.Tensor]:
    args = dict(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    model(**args)                                            # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        logits = model(**args).logits
    return (time.perf_counter() - t0) / repeats, logits.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--data", default=defaults.SEARCH_DATA)
    ap.add_argument("--device", default=defaults.DEVICE)
    ap.add_argument("--seq-len", type=int, default=defaults.SEARCH_SEQ_LEN)
    ap.add_argument("--num-seqs", type=int, default=defaults.SEARCH_SEQS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    tokens = load_tokens(args.data, tokenizer, args.seq_len, args.num_seqs, "search")
    tokens.input_ids, tokens.attention_mask = tokens.input_ids.to(args.device), tokens.attention_mask.to(args.device)
    seconds, logits = {}, {}
    for kernel in KERNELS:
        model.set_experts_implementation(kernel)
        seconds[kernel], logits[kernel] = time_forward(model, tokens, args.repeats)
        print(f"{kernel:>11}: {seconds[kernel]:.3f} s per forward of {len(tokens)} x {args.seq_len} tokens")
    diff = max(float((logits[k] - logits["grouped_mm"]).abs().max()) for k in KERNELS)
    speedup = seconds["grouped_mm"] / seconds["eager"]
    print(f"eager vs grouped_mm: {speedup:.2f}x faster, max |logit diff| {diff:.2e} (device {args.device}, "
          f"threads {torch.get_num_threads()}); allocopt uses {defaults.EXPERTS_IMPLEMENTATION}")
    if args.json:
        print(json.dumps({"speedup_eager_vs_grouped_mm": speedup, "max_abs_diff": diff, "seconds": seconds}))


if __name__ == "__main__":
    main()
