"""Structural expert removal (spec transformers-moe A.4): a model whose dropped experts are gone from every tensor
(expert weights, router rows, selection biases) and whose config records the per-layer counts in
``config.layer_num_experts`` (``models.pruned``), so it reloads with ``load_pruned``.

    prune_model(model, plan)          # in place; the same logits as mask_experts(model, plan.kept)
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from allocopt.models.adapter import MoEBlock, decoder_layers, describe, expert_tensors, find_moe_blocks, invalidate, text_config
from allocopt.models.families import COUNT_ATTRS, Family
from allocopt.models.routing import config_value
from allocopt.plan import Plan, check_kept

# The config field of a pruned checkpoint: one expert count per decoder layer (None for dense layers); see pruned.py.
LAYER_COUNTS_FIELD = "layer_num_experts"


def _replace(root: nn.Module, name: str, new: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = new


def _tensors(module: nn.Module, recurse: bool = True) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))


def _rows(keep: Sequence[int], n: int, size: int) -> torch.Tensor:
    """Indices to keep along a dim of ``size``: the kept experts, then any tail rows after the ``n`` routed ones."""
    return torch.tensor(sorted(int(e) for e in keep) + list(range(n, size)), dtype=torch.long)


def prune_block(block: MoEBlock, keep: Sequence[int]) -> None:
    """Keep only experts ``keep`` of one MoE block: expert tensors, router rows, biases, counts; tail rows (zero or
    skip experts, shared-expert rows of the router) stay, after the kept experts."""
    n, tail, family = block.info.num_experts, block.tail, block.family
    new_n = len(set(int(e) for e in keep))
    router_ids = {id(t) for _, t in _tensors(block.router)}
    with torch.no_grad():
        if isinstance(block.experts, nn.ModuleList):
            block.block._modules["experts"] = nn.ModuleList(block.experts[i] for i in sorted(keep))
        else:
            for name, t, rows in expert_tensors(block.experts, n, tail, family.expert_layout, router_ids):
                idx = _rows(keep, n, rows).to(t.device)
                if rows == t.shape[0]:
                    _replace(block.experts, name, t.index_select(0, idx))
                else:                                   # flattened [E*I, H]: view per expert, slice, flatten back
                    per = t.view(rows, -1, *t.shape[1:]).index_select(0, idx)
                    _replace(block.experts, name, per.reshape(-1, *t.shape[1:]))
        for name, t in _tensors(block.router):
            if t.dim() < 1 or (block.hash_routed and t.dtype in (torch.int32, torch.int64)):
                continue
            dims = [d for d in range(t.dim()) if t.shape[d] in (n, n + tail) and (t.shape[d] == n or tail)]
            if t is block.router_weight:
                dims = [0]
            if dims:
                d = dims[-1] if t is not block.router_weight else 0
                _replace(block.router, name, t.index_select(d, _rows(keep, n, int(t.shape[d])).to(t.device)))
        for name, t in _tensors(block.block, recurse=False):       # block-level selection biases (expert_bias)
            if t.dim() >= 1 and t.shape[-1] in (n, n + tail) and (t.shape[-1] == n or tail):
                _replace(block.block, name, t.index_select(t.dim() - 1, _rows(keep, n, int(t.shape[-1])).to(t.device)))
    for module in block.block.modules():
        for attr in COUNT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in (n, n + tail) and (value == n or tail):
                setattr(module, attr, new_n + (value - n))
        if isinstance(module, nn.Linear) and module.weight is block.router_weight:
            module.out_features = new_n + tail
    _per_layer_config(block, new_n)


def _per_layer_config(block: MoEBlock, new_n: int) -> None:
    """Modules that read the expert count from their config at run time (Zaya's skip class, Gemma-4's experts)
    get a copy of the config with this layer's count, so layers of different sizes each see their own."""
    config = block.config
    owners = [m for m in block.block.modules() if getattr(m, "config", None) is config]
    if not owners or config_value(config, block.family.count_field) == new_n:
        return
    view = copy.deepcopy(config)
    _set_config_value(view, block.family.count_field, new_n)
    for m in owners:
        m.config = view


def _set_config_value(config: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    obj = config
    for part in parents:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def _as_kept(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    if isinstance(plan_or_kept, Plan):
        plan_or_kept.validate_for(describe(model))
        return {l: list(k) for l, k in plan_or_kept.kept.items()}
    return {int(l): sorted(int(e) for e in k) for l, k in plan_or_kept.items()}


def checked_kept(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """The plan's kept ids per layer, checked against the model before any weight is touched."""
    kept = _as_kept(model, plan_or_kept)
    return check_kept([b.info for b in find_moe_blocks(model)], kept, "the plan", type(model).__name__)


def prune_model(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]], progress: bool = False) -> nn.Module:
    """Remove every expert not kept, in place, and record per-layer counts in the config. Returns ``model``."""
    kept = checked_kept(model, plan_or_kept)                # everything checked before any weight is touched
    blocks = find_moe_blocks(model)
    for b in tqdm(blocks, desc="pruning layers", unit="layer", disable=not progress):
        if b.layer in kept and len(kept[b.layer]) < b.info.num_experts:
            prune_block(b, kept[b.layer])
    invalidate(model)
    _record_counts(model, blocks[0].family)
    return model


def _record_counts(model: nn.Module, family: Family) -> None:
    counts = {b.layer: b.info.num_experts for b in find_moe_blocks(model)}
    num_layers = len(decoder_layers(model)[1])
    config = text_config(model)
    for target in {id(model.config): model.config, id(config): config}.values():
        setattr(target, LAYER_COUNTS_FIELD, [counts.get(i) for i in range(num_layers)])
    if family.count_field and not family.count_field_shared:
        _set_config_value(config, family.count_field, max(counts.values()))


def record_counts(model: nn.Module) -> None:
    """Write the model's per-layer expert counts to ``config.layer_num_experts`` (and the family's count field)."""
    _record_counts(model, find_moe_blocks(model)[0].family)


__all__ = ["LAYER_COUNTS_FIELD", "checked_kept", "prune_block", "prune_model", "record_counts"]
