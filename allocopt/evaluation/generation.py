"""Batched greedy generation for any causal LM: prompts are left-padded so every row continues at its end.

The same tasks run through vLLM: a model argument with ``greedy_ids`` (``allocopt.serving.vllm_engine.VllmGenerator``)
gets the token ids of the prompts, tokenised exactly as here, and returns the generated ids.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from allocopt.models.hooks import input_device


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


@runtime_checkable
class TokenGenerator(Protocol):
    """A generation engine other than an in-process transformers model (vLLM)."""

    def greedy_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Exactly ``max_new_tokens`` greedy token ids after each prompt (EOS does not stop generation)."""
        ...


@torch.inference_mode()
def greedy_continuations(model: nn.Module | TokenGenerator, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                         batch_size: int = 64) -> list[str]:
    """The decoded greedy continuation of each prompt (``max_new_tokens`` tokens; callers cut at a newline)."""
    if isinstance(model, TokenGenerator):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return [tokenizer.decode(g, skip_special_tokens=True) for g in model.greedy_ids(rows, max_new_tokens)]
    device = input_device(model)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[s:s + batch_size]]
        ids, mask = left_pad(rows, pad_id(tokenizer))
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   pad_token_id=pad_id(tokenizer), eos_token_id=None)
        out.extend(tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True) for g in generated)
    return out


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]
