"""Structural expert removal, pruned-checkpoint export and strict reload (spec transformers-moe A.4).

A pruned checkpoint is a stock transformers checkpoint plus ``config.layer_num_experts`` (one count per
decoder layer, ``None`` for dense layers); the family's count field holds the largest count. Stock
``from_pretrained`` builds every layer at that largest size, so ``load_pruned`` uses a subclass that
shrinks each layer right after ``__init__`` (on the meta device) and keeps the stock ``__name__`` and
``__module__``: transformers applies its weight-renaming rules only to classes it recognises as its own.

Example::

    save_pruned(model, tokenizer, "out/", plan)        # prunes in place, writes safetensors atomically
    model = load_pruned("out/")                        # same logits as mask_experts(model, plan.kept)
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from allocopt.errors import AllocoptError
from allocopt.io import atomic_directory, atomic_write_text
from allocopt.models.adapter import MoEBlock, decoder_layers, describe, find_moe_blocks, invalidate
from allocopt.models.families import COUNT_ATTRS, Family, family_for
from allocopt.plan import PLAN_FILE, Plan

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


def _check_groups(block: MoEBlock, keep: Sequence[int], groups: int) -> None:
    """Group-limited routing picks groups by their best experts; removal re-partitions the groups unless
    every group loses the same number of experts, which would silently change the model."""
    size = block.info.num_experts // groups
    per_group = [sum(1 for e in keep if e // size == g) for g in range(groups)]
    if len(set(per_group)) > 1:
        raise AllocoptError(f"layer {block.layer} uses group-limited routing ({groups} groups of {size}) and the plan keeps "
                            f"{per_group} experts per group; structural removal must keep the same number in every group "
                            "(masking is fine), so use a group-balanced plan")


def prune_block(block: MoEBlock, keep: Sequence[int]) -> None:
    """Keep only experts ``keep`` (sorted ids) of one MoE block: expert tensors, router rows, biases, counts."""
    n = block.info.num_experts
    idx = torch.tensor(sorted(int(e) for e in keep), dtype=torch.long)
    new_n = len(idx)
    with torch.no_grad():
        if isinstance(block.experts, nn.ModuleList):
            block.block._modules["experts"] = nn.ModuleList(block.experts[i] for i in idx.tolist())
        else:
            for name, t in _tensors(block.experts, recurse=False):
                if t.dim() >= 1 and t.shape[0] == n:
                    _replace(block.experts, name, t.index_select(0, idx.to(t.device)))
        weight = block.router_weight
        for name, t in _tensors(block.router):
            dims = [0] if t is weight else [d for d in range(t.dim()) if t.shape[d] == n][-1:]
            if dims:
                _replace(block.router, name, t.index_select(dims[0], idx.to(t.device)))
        for name, t in _tensors(block.block, recurse=False):          # block-level selection biases (expert_bias)
            if t.dim() >= 1 and t.shape[-1] == n:
                _replace(block.block, name, t.index_select(t.dim() - 1, idx.to(t.device)))
    for module in (block.block, block.router, block.experts):
        for attr in COUNT_ATTRS:
            if getattr(module, attr, None) == n:
                setattr(module, attr, new_n)
    if isinstance(block.router, nn.Linear):
        block.router.out_features = new_n


def _as_kept(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    if isinstance(plan_or_kept, Plan):
        plan_or_kept.validate_for(describe(model))
        return {l: list(k) for l, k in plan_or_kept.kept.items()}
    return {int(l): sorted(int(e) for e in k) for l, k in plan_or_kept.items()}


def prune_model(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]], progress: bool = False) -> nn.Module:
    """Remove every expert not kept, in place, and record per-layer counts in the config. Returns ``model``."""
    kept = _as_kept(model, plan_or_kept)
    blocks = find_moe_blocks(model)
    by_layer = {b.layer: b for b in blocks}
    unknown = sorted(set(kept) - set(by_layer))
    if unknown:
        raise AllocoptError(f"layers {unknown} are not MoE layers of {type(model).__name__} (MoE layers: {sorted(by_layer)}); "
                            "use a plan made for this model")
    family = family_for(getattr(model.config, "model_type", "") or "")
    groups = int(getattr(model.config, family.group_field, 1) or 1) if family.group_field else 1
    for layer, keep in kept.items():                   # validate everything before touching any weight
        b = by_layer[layer]
        if any(not 0 <= e < b.info.num_experts for e in keep) or len(set(keep)) < b.info.top_k:
            raise AllocoptError(f"layer {layer} keeps {keep}: ids must be in 0..{b.info.num_experts - 1} and at least "
                                f"top-k={b.info.top_k} of them; fix the plan")
        if groups > 1 and len(keep) < b.info.num_experts:
            _check_groups(b, keep, groups)
    for b in tqdm(blocks, desc="pruning layers", unit="layer", disable=not progress):
        if b.layer in kept and len(kept[b.layer]) < b.info.num_experts:
            prune_block(b, kept[b.layer])
    invalidate(model)
    _record_counts(model, family)
    return model


def _record_counts(model: nn.Module, family: Family) -> None:
    counts = {b.layer: b.info.num_experts for b in find_moe_blocks(model)}
    num_layers = len(decoder_layers(model)[1])
    setattr(model.config, LAYER_COUNTS_FIELD, [counts.get(i) for i in range(num_layers)])
    setattr(model.config, family.count_field, max(counts.values()))


def save_pruned(model: nn.Module, tokenizer: Any, out_dir: str | Path, plan: Plan | Mapping[int, Sequence[int]],
                card: str | None = None, overwrite: bool = False) -> Path:
    """Write the pruned checkpoint (safetensors, the model's dtype) atomically to ``out_dir``.

    ``model`` is pruned in place first unless it already has the plan's counts (no second copy of the
    weights is ever made). Writes plan.json (for a ``Plan``) and README.md (``card``) beside the weights.
    """
    kept = plan.kept if isinstance(plan, Plan) else {int(l): tuple(k) for l, k in plan.items()}
    current = {b.layer: b.info.num_experts for b in find_moe_blocks(model)}
    if any(current.get(l) != len(k) for l, k in kept.items()):
        prune_model(model, plan)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if isinstance(plan, Plan):
            plan.save(tmp / PLAN_FILE)
        if card is not None:
            atomic_write_text(tmp / "README.md", card)
    return out_dir


@functools.cache
def pruned_class(base: type) -> type:
    """``base`` whose layers shrink to ``config.layer_num_experts`` right after construction (meta device
    inside ``from_pretrained``); the real weights then load into the smaller shapes."""

    class Pruned(base):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            counts = getattr(config, LAYER_COUNTS_FIELD, None) or []
            for b in find_moe_blocks(self):
                n = counts[b.layer] if b.layer < len(counts) else None
                if n is not None and n != b.info.num_experts:
                    prune_block(b, range(n))
            invalidate(self)

    Pruned.__name__, Pruned.__qualname__, Pruned.__module__ = base.__name__, base.__qualname__, base.__module__
    return Pruned


def _stock_class(config: Any, path: Path) -> type:
    arch = (getattr(config, "architectures", None) or [None])[0]
    base = getattr(transformers, arch, None) if arch else None
    if not (isinstance(base, type) and base.__module__.startswith("transformers.")):
        raise AllocoptError(f"{path}/config.json names architecture {arch!r}, which is not a transformers class; "
                            "allocopt loads pruned checkpoints with stock transformers classes only")
    return base


def load_pruned(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu") -> nn.Module:
    """Load an allocopt checkpoint with the stock transformers class, strictly: any missing, unexpected or
    mis-shaped weight is an error (a silently re-initialised expert would be a different model)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AllocoptError(f"{path} has no config.json; pass a directory written by `allocopt prune`")
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    cls = pruned_class(_stock_class(config, path))
    try:
        model, report = cls.from_pretrained(path, config=config, dtype=dtype or "auto", use_safetensors=True,
                                            trust_remote_code=False, output_loading_info=True)
    except RuntimeError as exc:          # transformers refuses mis-shaped weights itself
        raise AllocoptError(f"checkpoint {path} does not match its config ({str(exc).splitlines()[0]}); "
                            "re-export it with `allocopt prune`") from exc
    problems = {k: sorted(v) for k, v in report.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}" for k, v in problems.items())
        raise AllocoptError(f"checkpoint {path} does not match its config ({detail}); re-export it with `allocopt prune`")
    return model.to(device).eval()
