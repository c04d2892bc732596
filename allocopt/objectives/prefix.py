"""Run a decoder from layer j on cached hidden states, and keep those states in a bounded LRU.

Two candidates that keep the same experts in every MoE layer before layer j compute identical hidden
states at the input of layer j, so the second one can start there. The trick needs no per-family code:
decoder layers 0..j-1 have their ``forward`` temporarily replaced by one that returns the cached tensor,
so embeddings, the causal mask, rotary tables and per-layer attention types (indexed by position in the
list) are all computed exactly as in a normal forward, and only the real layers j.. do work.
``DecoderRunner.check`` compares this against a full forward once; callers fall back when it differs.

Example::

    runner = DecoderRunner(model)
    logits, states = runner.run(ids, mask, capture=[2, 4])        # full forward, keep inputs of layers 2, 4
    logits2, _ = runner.run(ids, mask, start=2, hidden=states[2])  # same logits, layers 0-1 skipped
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Hashable, Iterator, Sequence

import torch
from torch import nn

from allocopt.models.adapter import decoder_layers


class DecoderRunner:
    def __init__(self, model: nn.Module):
        self.model = model
        _, self.layers = decoder_layers(model)

    @contextlib.contextmanager
    def _skip(self, start: int, hidden: torch.Tensor | None) -> Iterator[None]:
        patched = []
        try:
            for layer in list(self.layers)[:start]:
                if "forward" in layer.__dict__:
                    raise RuntimeError("decoder layer already has an instance forward; prefix reuse would clobber it")
                layer.forward = lambda *a, **k: hidden
                patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.forward

    @contextlib.contextmanager
    def _capture(self, layers: Sequence[int], out: dict[int, torch.Tensor]) -> Iterator[None]:
        def hook(index: int):
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                out[index] = h.detach().clone()
            return fn
        handles = [self.layers[j].register_forward_pre_hook(hook(j), with_kwargs=True) for j in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
            hidden: torch.Tensor | None = None, capture: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [B, T, V] and the hidden states at the input of each layer in ``capture`` (all > start)."""
        if start and hidden is None:
            raise ValueError("start > 0 needs the hidden states at the input of layer `start`")
        states: dict[int, torch.Tensor] = {}
        with self._skip(start, hidden), self._capture([j for j in capture if j > start], states):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits, states

    def check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]) -> bool:
        """True when starting from every layer in ``layers`` reproduces the full forward's logits."""
        full, states = self.run(input_ids, attention_mask, capture=layers)
        atol = 1e-5 if full.dtype == torch.float32 else 1e-2
        for j in layers:
            if j == 0:
                continue
            part, _ = self.run(input_ids, attention_mask, start=j, hidden=states[j])
            if part.shape != full.shape or not torch.allclose(part.float(), full.float(), rtol=0, atol=atol, equal_nan=True):
                return False
        return True


class PrefixCache:
    """LRU of hidden-state tensors under a byte budget. ``protect`` keeps an entry through eviction until
    ``release()`` (states that later candidates of the current population are known to need)."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.bytes = 0
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._protected: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> torch.Tensor | None:
        t = self._data.get(key)
        if t is not None:
            self._data.move_to_end(key)
        return t

    def put(self, key: Hashable, value: torch.Tensor, protect: bool = False) -> bool:
        size = value.numel() * value.element_size()
        if key in self._data:
            self._data.move_to_end(key)
        else:
            for old in [k for k in self._data if k not in self._protected]:
                if self.bytes + size <= self.budget:
                    break
                self.bytes -= self._drop(old)
            if self.bytes + size > self.budget:
                return False
            self._data[key] = value
            self.bytes += size
        if protect:
            self._protected.add(key)
        return True

    def _drop(self, key: Hashable) -> int:
        t = self._data.pop(key)
        return t.numel() * t.element_size()

    def release(self) -> None:
        self._protected.clear()

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._data), "bytes": self.bytes, "budget": self.budget}
