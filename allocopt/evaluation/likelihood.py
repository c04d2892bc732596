"""Log-likelihood of continuations given contexts, and multiple choice scored by it."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from allocopt.evaluation.generation import pad_id
from allocopt.models.hooks import input_device


@torch.inference_mode()
def continuation_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                          batch_size: int = 32) -> list[float]:
    """Sum of log p(continuation tokens | context) per (context, continuation) pair.

    Context and continuation are tokenized separately and concatenated, so every choice of one question is
    scored on the same context tokens.
    """
    device = input_device(model)
    encoded = [(tokenizer(c, add_special_tokens=False)["input_ids"], tokenizer(x, add_special_tokens=False)["input_ids"])
               for c, x in pairs]
    scores: list[float] = []
    for s in range(0, len(encoded), batch_size):
        chunk = encoded[s:s + batch_size]
        rows = [c + x for c, x in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id(tokenizer)] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for b, (c, x) in enumerate(chunk):
            positions = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=device)
            scores.append(float(logp[b, positions, ids[b, positions + 1]].sum()))
    return scores


def multiple_choice_accuracy(model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int = 32) -> float:
    """Items are ``{"context", "choices", "answer"}``; the choice with the highest per-character log-likelihood
    wins (length-normalised like lm-eval's acc_norm, so short distractors get no free advantage)."""
    pairs = [(item["context"], choice) for item in items for choice in item["choices"]]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size)
    correct, i = 0, 0
    for item in items:
        n = len(item["choices"])
        normed = [scores[i + j] / max(len(item["choices"][j]), 1) for j in range(n)]
        correct += int(max(range(n), key=normed.__getitem__) == item["answer"])
        i += n
    return correct / max(len(items), 1)
