"""Held-out perplexity: exp of the mean next-token NLL over the scored positions of a TokenSet."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from allocopt.data.tokens import TokenSet
from allocopt.models.hooks import input_device


@torch.inference_mode()
def perplexity(model: nn.Module, tokens: TokenSet, batch_size: int = 16) -> float:
    """Position t scores token t+1 where ``score_mask[t]`` (the TokenSet convention), so padding never counts."""
    device = input_device(model)
    total, count = 0.0, 0
    for batch in tokens.batches(batch_size):
        ids = batch.input_ids.to(device)
        logits = model(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        mask = batch.score_mask[:, :-1].to(device)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))
