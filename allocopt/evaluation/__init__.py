"""Held-out evaluation tasks of the testbed: perplexity, math EM, code EM and multiple-choice accuracy.

    from allocopt.evaluation import evaluate
    metrics = evaluate(model, tokenizer, limit=50)   # {"ppl": {...}, "math_em": ..., "code_em": ..., "mc_acc": ...}
"""
from allocopt.evaluation.harness import evaluate

__all__ = ["evaluate"]
