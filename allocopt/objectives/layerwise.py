"""Score a whole population of plans one decoder layer at a time, for models larger than memory.

Scoring candidates one by one forwards every candidate through every layer, so an offloaded model reads each layer's
weights from disk once per candidate and micro-batch. Here the loop is inverted: layer j's weights are made resident
once (:func:`allocopt.runtime.decoder.resident`), every (micro-batch, plan) state goes through it, and only then does
layer j+1 load. Plans that keep the same experts in every MoE layer before j share one state at j (a prefix tree), so
the prefix reuse of the per-candidate path applies within the generation as well; a plan whose prefix state is in the
engine's cache from an earlier generation joins at that layer. The embedding, final norm and head stay resident for
the whole pass. Peak memory: one layer's weights + the head + the states of the live prefixes (rows x tokens x
hidden each).

Same per-position values as the per-candidate path (the same layer calls on the same inputs; checked in
``tests/test_models_dispatch.py``). The idea is the layer-wise pass of memory-bounded pruning pipelines
(SparseGPT/Wanda's sequential layer loop), applied to a population instead of one model.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from allocopt.models import mask_experts
from allocopt.runtime.decoder import DecoderRunner, State, resident

Key = tuple[tuple[tuple[int, ...], int], ...]      # (kept ids, bits; 0: unquantized) per MoE layer (engine.Key)


@dataclass
class Job:
    """One plan on one micro-batch: ``key`` ((kept ids, bits) per MoE layer), where it starts (MoE position ``start`` with the
    input state ``state``; -1 and None: from the embedding)."""

    batch: int
    key: Key
    start: int = -1
    state: State | None = None


@torch.no_grad()
def run_layerwise(model: nn.Module, runner: DecoderRunner, moe_layers: Sequence[int], full: Key,
                  batches: Sequence[Any], jobs: Sequence[Job],
                  on_state: Callable[[int, int, Key, State], None],
                  on_logits: Callable[[Job, torch.Tensor, int], None]) -> None:
    """Forward every job layer by layer; ``on_state(batch, moe_pos, prefix, state)`` receives each state at the input of
    an MoE layer (for the engine's prefix cache), ``on_logits(job, logits [B, T, V], layer_tokens)`` each job's logits
    and its share of the layer-tokens run (a shared prefix's cost is split between the plans that share it). Plans with
    quantized layers are not scored here (the engine refuses them on an offloaded model)."""
    n_layers = len(runner.layers)
    before = lambda d: bisect.bisect_left(moe_layers, d)           # noqa: E731  MoE layers strictly before layer d
    start_layer = {id(j): moe_layers[j.start] if j.start >= 0 else 0 for j in jobs}
    states: dict[tuple[int, Key], State] = {}                       # (batch, prefix) -> output of the previous layer
    embeddings: dict[int, torch.Tensor] = {}
    cost: dict[int, float] = {id(j): 0.0 for j in jobs}
    with resident(model, exclude=runner.layers):                   # embedding, final norm and head: once per pass
        for c in sorted({j.batch for j in jobs if j.start < 0}):
            embeddings[c] = runner.embed(batches[c].input_ids, batches[c].attention_mask)
        for d in range(n_layers):
            for j in jobs:                                          # plans whose cached state starts them here
                if start_layer[id(j)] == d and j.start >= 0:
                    states.setdefault((j.batch, j.key[:j.start]), j.state)
            live = [j for j in jobs if start_layer[id(j)] <= d]
            groups: dict[tuple[int, Key], list[Job]] = {}
            for j in live:
                groups.setdefault((j.batch, j.key[:before(d + 1)]), []).append(j)
            if not groups:
                continue
            out: dict[tuple[int, Key], State] = {}
            layer = runner.layers[d]
            with resident(layer):
                for (c, prefix), members in groups.items():
                    batch = batches[c]
                    state = states.get((c, prefix[:before(d)])) if d else None
                    kept = {d: list(prefix[-1][0])} if d in moe_layers and prefix[-1] != full[moe_layers.index(d)] else {}
                    with mask_experts(model, kept):
                        out[(c, prefix)], emb = runner.run_layer(batch.input_ids, batch.attention_mask, d, state,
                                                                 embeddings.get(c))
                    embeddings.setdefault(c, emb)
                    share = batch.input_ids.numel() / len(members)
                    for j in members:
                        cost[id(j)] += share
            states = out
            nxt = before(d + 1)
            if nxt < len(moe_layers) and moe_layers[nxt] == d + 1:   # inputs of the next MoE layer: cache them
                for (c, prefix), state in states.items():
                    on_state(c, nxt, prefix, state)
        for j in jobs:
            c = j.batch
            logits, _ = runner.run(batches[c].input_ids, batches[c].attention_mask, start=n_layers,
                                   hidden=states[(c, j.key[:len(moe_layers)])])
            on_logits(j, logits, int(round(cost[id(j)])))


__all__ = ["Job", "run_layerwise"]
