"""ESAP candidates per second: the reference-style evaluator vs ``allocopt.objectives.Evaluator``.

Both score the SAME GA-like stream (one parent plan, children made by level-switch moves of 1-4 experts
between two layers, some duplicates). The naive evaluator does what the reference did, but in fp32 so the
two agree: per candidate, mask, one forward per row, re-read each row's full-vocab teacher logits and
re-softmax them, plain loop. Setup (teacher caches) is timed separately from candidate evaluation.

    python benchmarks/esap_throughput.py --json            # last line {"speedup", "max_abs_diff", "cache_ratio"}
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from allocopt import defaults
from allocopt.data import load_tokens
from allocopt.models import describe, mask_experts
from allocopt.runtime import load_model
from allocopt.objectives import Evaluator


def ga_stream(info, n: int, seed: int, population: int) -> list[dict[int, list[int]]]:
    """A parent at 50 % density, then children of it: move d in 1..4 kept slots from layer a to layer b."""
    rng = random.Random(seed)
    layers = sorted(info.num_experts)
    parent = {l: sorted(rng.sample(range(e), max(info.top_k[l], e // 2))) for l, e in info.num_experts.items()}
    out = [parent]
    while len(out) < n:
        if len(out) % population == population - 1:
            out.append(dict(rng.choice(out)))                       # a duplicate (re-evaluated elite)
            continue
        a, b = rng.sample(layers, 2)
        d = rng.randint(1, 4)
        ka, kb = list(parent[a]), list(parent[b])
        free = sorted(set(range(info.num_experts[b])) - set(kb))
        d = min(d, len(ka) - info.top_k[a], len(free))
        if d <= 0:
            continue
        for e in rng.sample(ka, d):
            ka.remove(e)
        kb += rng.sample(free, d)
        out.append({**parent, a: sorted(ka), b: sorted(kb)})
    return out


class NaiveEvaluator:
    """The reference's loop: full-vocab teacher logits on host, per candidate per row: upload, softmax, compare."""

    def __init__(self, model, tokens):
        self.model, self.tokens = model, tokens
        with torch.no_grad():
            self.teacher = [model(input_ids=tokens.input_ids[i:i + 1], attention_mask=tokens.attention_mask[i:i + 1]).logits.float().cpu()
                            for i in range(len(tokens))]

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(t.numel() for t in self.teacher) * torch.empty((), dtype=dtype).element_size()

    @torch.no_grad()
    def evaluate(self, plan) -> float:
        total, count = 0.0, 0
        device = next(self.model.parameters()).device
        with mask_experts(self.model, plan):
            for i in range(len(self.tokens)):
                q = self.model(input_ids=self.tokens.input_ids[i:i + 1], attention_mask=self.tokens.attention_mask[i:i + 1]).logits
                p = torch.softmax(self.teacher[i].to(device), -1)
                score = self.tokens.score_mask[i:i + 1]
                a = torch.minimum(p, torch.softmax(q.float(), -1)).sum(-1)[score]
                total += float(a.double().sum())
                count += int(score.sum())
        return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--data", default=defaults.SEARCH_DATA)
    ap.add_argument("--seq-len", type=int, default=defaults.SEARCH_SEQ_LEN)
    ap.add_argument("--num-seqs", type=int, default=defaults.SEARCH_SEQS)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--population", type=int, default=defaults.POPULATION)
    ap.add_argument("--device", default="cpu", help="e.g. cuda; the naive evaluator then pays the reference's "
                    "host->device teacher upload per candidate")
    ap.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 [default: the checkpoint's]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    tokens = load_tokens(args.data, tokenizer, args.seq_len, args.num_seqs, "search").to(args.device)
    info = describe(model)
    plans = ga_stream(info, args.candidates, defaults.SEED, args.population)

    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    naive = NaiveEvaluator(model, tokens)
    t1 = time.perf_counter()
    slow = [naive.evaluate(p) for p in plans]
    t2 = time.perf_counter()
    engine = Evaluator(model, tokens)
    sync()
    t3 = time.perf_counter()
    fast = []
    for s in range(0, len(plans), args.population):                 # one call per GA generation
        fast += engine.evaluate(plans[s:s + args.population])
    sync()
    t4 = time.perf_counter()

    naive_rate, engine_rate = len(plans) / (t2 - t1), len(plans) / (t4 - t3)
    diff = max(abs(a - b.value) for a, b in zip(slow, fast))
    width = max(b.hi - b.lo for b in fast)
    bf16, fp32 = naive.nbytes(torch.bfloat16), naive.nbytes(torch.float32)
    ratio = engine.teacher.nbytes / bf16
    print(f"model {args.model}: {len(tokens)} x {args.seq_len} tokens of {args.data}, {tokens.num_scored} scored, "
          f"{len(plans)} candidates ({len({engine.key(p) for p in plans})} distinct), device {args.device}, "
          f"dtype {next(model.parameters()).dtype}, threads {torch.get_num_threads()}")
    print(f"naive : {naive_rate:8.2f} cand/s  (setup {t1 - t0:.2f}s, eval {t2 - t1:.2f}s)")
    print(f"engine: {engine_rate:8.2f} cand/s  (setup {t3 - t2:.2f}s, eval {t4 - t3:.2f}s)  stats {engine.stats()}")
    print(f"speedup {engine_rate / naive_rate:.2f}x  max|ESAP diff| {diff:.2e}  max bound width {width:.2e}")
    print(f"teacher cache: naive full-vocab {fp32 / 2**20:.2f} MB fp32 / {bf16 / 2**20:.2f} MB bf16; "
          f"engine {engine.teacher.mode} {engine.teacher.nbytes / 2**20:.3f} MB "
          f"({engine.teacher.mean_entries:.1f} entries/position, mean tail {engine.teacher.mean_tail:.2e}); ratio vs bf16 {ratio:.4f}")
    if args.json:
        print(json.dumps({"speedup": engine_rate / naive_rate, "max_abs_diff": diff, "cache_ratio": ratio}))


if __name__ == "__main__":
    main()
