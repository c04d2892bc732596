"""The testbed's must-show numbers: held-out metrics, expert specialisation, and that allocation matters.

    python benchmarks/testbed_report.py [--model PATH] [--limit N]

1. held-out metrics of the shipped model (``allocopt.evaluation.evaluate``);
2. per-layer total-variation distance between the code and math routing-frequency histograms (top-k selections
   per expert, counted from the router logits the model returns with ``output_router_logits=True``);
3. 50% Frequency pruning (each layer keeps its most often routed experts on the mixed, then the math calibration split) under a uniform
   allocation and under two non-uniform allocations with the same total, evaluated with ``mask_experts``.
"""
from __future__ import annotations

import argparse
import json

import torch

from allocopt.config import shipped_corpus
from allocopt.data.tokens import documents_to_tokens
from allocopt.evaluation import evaluate
from allocopt.models import describe, find_moe_blocks, mask_experts
from allocopt.runtime import load_model
from allocopt.runtime.loading import resolve
from allocopt.evaluation.tasks import corpus_named

SEQS, SEQ_LEN = 32, 256


@torch.inference_mode()
def routing_counts(model, tokenizer, domain: str, split: str, corpus: str = "testbed") -> torch.Tensor:
    """[layers, experts] counts of top-k selections over real (non-padding) tokens."""
    tokens = documents_to_tokens(corpus_named(corpus).documents(domain, split), tokenizer, SEQ_LEN, SEQS,
                                 f"{corpus}:{domain}")
    blocks = find_moe_blocks(model)
    counts = torch.zeros(len(blocks), blocks[0].info.num_experts)
    for batch in tokens.batches(8):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
        real = batch.attention_mask.flatten().bool()
        for i, (block, logits) in enumerate(zip(blocks, out.router_logits)):
            chosen = logits[real].topk(block.info.top_k, dim=-1).indices
            counts[i] += torch.bincount(chosen.flatten(), minlength=counts.shape[1]).float()
    return counts


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per layer: half the L1 distance between the two normalised histograms (0 = same routing, 1 = disjoint)."""
    return 0.5 * (a / a.sum(1, keepdim=True) - b / b.sum(1, keepdim=True)).abs().sum(1)


def keep_most_frequent(counts: torch.Tensor, layers: list[int], allocation: list[int]) -> dict[int, list[int]]:
    return {layer: sorted(counts[i].argsort(descending=True)[:n].tolist()) for i, (layer, n) in enumerate(zip(layers, allocation))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="a testbed checkpoint, e.g. one retrained with "
                        "`python -m allocopt.testbed.train --out DIR` [default: the shipped one]")
    parser.add_argument("--limit", type=int, default=None, help="items per evaluation task")
    parser.add_argument("--tasks-from", dest="corpus", default=None, help="testbed or deep [default: by --model]")
    args = parser.parse_args()
    corpus = args.corpus or shipped_corpus(args.model) or "testbed"
    model, tokenizer = load_model(args.model)
    log_path = resolve(args.model) / "train_log.json"
    trained = json.loads(log_path.read_text()) if log_path.is_file() else {}
    print(f"model {args.model}: fingerprint {describe(model).fingerprint[:12]}, "
          + ", ".join(f"{k} {trained.get(k)}" for k in ("seed", "steps", "threads", "torch", "train_seconds")))

    full = evaluate(model, tokenizer, limit=args.limit, corpus=corpus)
    print("held-out metrics:")
    print(f"  ppl  {json.dumps({d: round(v, 3) for d, v in full['ppl'].items()})}")
    print(f"  math_em {full['math_em']:.3f}  by form {json.dumps({f: round(v, 3) for f, v in full['math_em_by_form'].items()})}")
    print(f"  code_em {full['code_em']:.3f}  code_edit_sim {full['code_edit_sim']:.3f}  mc_acc {full['mc_acc']:.3f}  "
          f"by domain {json.dumps({d: round(v, 3) for d, v in full['mc_acc_by_domain'].items()})}")

    tv = total_variation(routing_counts(model, tokenizer, "code", "heldout", corpus),
                         routing_counts(model, tokenizer, "math", "heldout", corpus))
    print("expert specialisation: TV distance between code and math routing histograms")
    print("  per layer " + " ".join(f"{v:.3f}" for v in tv.tolist()) + f"  mean {tv.mean():.3f}")

    blocks = find_moe_blocks(model)
    layers, n = [b.layer for b in blocks], blocks[0].info.num_experts
    k, total = blocks[0].info.top_k, len(blocks) * n // 2
    # a linear ramp from top-k to n - top-k experts; antisymmetric offsets keep the total at exactly 50%
    ramp = [n // 2 + round((n // 2 - k) * (2 * i / (len(layers) - 1) - 1)) for i in range(len(layers))]
    assert sum(ramp) == total
    allocations = {"uniform": [n // 2] * len(layers), "late-heavy": sorted(ramp), "early-heavy": sorted(ramp, reverse=True)}
    # Frequency counted on the mixed calibration split, and on the math calibration split (calibrating on the
    # domain one evaluates is what a user would do; the mixed ranking drops experts math needs).
    for calibration in ("mix", "math"):
        counts = routing_counts(model, tokenizer, calibration, "calibration", corpus)
        print(f"allocation matters: 50% Frequency pruning ({total} of {len(layers) * n} experts kept), "
              f"Frequency counted on testbed:{calibration} calibration")
        print(f"  {'allocation':<12} {'kept per layer':<28} {'math_em':>8} {'mc_acc':>7} {'ppl math':>9} {'ppl code':>9} {'ppl prose':>9}")
        print(f"  {'full':<12} {str([n] * len(layers)):<28} {full['math_em']:>8.3f} {full['mc_acc']:>7.3f} "
              f"{full['ppl']['math']:>9.3f} {full['ppl']['code']:>9.3f} {full['ppl']['prose']:>9.3f}")
        for name, allocation in allocations.items():
            with mask_experts(model, keep_most_frequent(counts, layers, allocation)):
                m = evaluate(model, tokenizer, limit=args.limit, corpus=corpus)
            print(f"  {name:<12} {str(allocation):<28} {m['math_em']:>8.3f} {m['mc_acc']:>7.3f} {m['ppl']['math']:>9.3f} "
                  f"{m['ppl']['code']:>9.3f} {m['ppl']['prose']:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
