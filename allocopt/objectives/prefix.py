"""Run a decoder from layer j on cached hidden states, and keep those states in a bounded LRU.

Two candidates that keep the same experts in every MoE layer before layer j compute identical hidden
states at the input of layer j, so the second one can start there. The trick needs no per-family code:
decoder layers 0..j-1 have their ``forward`` temporarily replaced by one that returns the cached output of
layer j-1, so embeddings, the causal mask, rotary tables and per-layer attention types (indexed by position
in the list) are all computed exactly as in a normal forward, and only the real layers j.. do work.
A layer's output is cached whole, whatever its structure: a tensor for most families, a tuple where a layer
hands more than its hidden state to the next one (GLM-MoE-DSA and HY-V4 pass the indexer's top-k along).
A layer that already has an instance ``forward`` (accelerate's offload hooks) keeps it: it is restored after.
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


State = Any          # a decoder layer's output: a tensor, or a tuple whose first item is the hidden state


def _detached(output: State) -> State:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output


def state_bytes(state: State) -> int:
    """Bytes held by a cached layer output (tensors inside tuples included)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(s) for s in state)
    return 0


class DecoderRunner:
    def __init__(self, model: nn.Module):
        self.model = model
        _, self.layers = decoder_layers(model)

    @contextlib.contextmanager
    def _skip(self, start: int, state: State) -> Iterator[None]:
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for layer in list(self.layers)[:start]:
                patched.append((layer, layer.__dict__.get("forward")))
                layer.forward = lambda *a, **k: state
            yield
        finally:
            for layer, previous in patched:
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    @contextlib.contextmanager
    def _capture(self, layers: Sequence[int], out: dict[int, State]) -> Iterator[None]:
        """``out[j]`` = the output of decoder layer j-1, i.e. everything layer j is started from."""
        def hook(index: int):
            def fn(module: nn.Module, args: tuple, output: State) -> None:
                out[index] = _detached(output)
            return fn
        handles = [self.layers[j - 1].register_forward_hook(hook(j)) for j in layers if j > 0]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
            hidden: State | None = None, capture: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, State]]:
        """Logits [B, T, V] and the states layers in ``capture`` (all > start) start from."""
        if start and hidden is None:
            raise ValueError("start > 0 needs the output of layer start-1 (the state layer `start` starts from)")
        states: dict[int, State] = {}
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
        self._data: OrderedDict[Hashable, State] = OrderedDict()
        self._protected: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> State | None:
        t = self._data.get(key)
        if t is not None:
            self._data.move_to_end(key)
        return t

    def put(self, key: Hashable, value: State, protect: bool = False) -> bool:
        size = state_bytes(value)
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
        return state_bytes(self._data.pop(key))

    def release(self) -> None:
        self._protected.clear()

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._data), "bytes": self.bytes, "budget": self.budget}
