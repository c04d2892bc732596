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

import copy
import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from allocopt.errors import AllocoptError
from allocopt.io import atomic_directory, atomic_write_text
from allocopt.models.adapter import (MoEBlock, decoder_layers, describe, expert_tensors, find_moe_blocks, invalidate,
                                     kept_problem, text_config)
from allocopt.models.families import COUNT_ATTRS, Family
from allocopt.models.routing import config_value
from allocopt.models.streaming import is_offloaded, write_streamed
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


def _validate(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """The plan's kept ids per layer, checked against the model before any weight is touched."""
    kept = _as_kept(model, plan_or_kept)
    by_layer = {b.layer: b for b in find_moe_blocks(model)}
    unknown = sorted(set(kept) - set(by_layer))
    if unknown:
        raise AllocoptError(f"layers {unknown} are not MoE layers of {type(model).__name__} (MoE layers: {sorted(by_layer)}); "
                            "use a plan made for this model")
    for layer, keep in kept.items():
        problem = kept_problem(by_layer[layer].info, keep)
        if problem:
            raise AllocoptError(f"layer {layer} {problem}; fix the plan")
    return kept


def prune_model(model: nn.Module, plan_or_kept: Plan | Mapping[int, Sequence[int]], progress: bool = False) -> nn.Module:
    """Remove every expert not kept, in place, and record per-layer counts in the config. Returns ``model``."""
    kept = _validate(model, plan_or_kept)                # everything checked before any weight is touched
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


def save_pruned(model: nn.Module, tokenizer: Any, out_dir: str | Path, plan: Plan | Mapping[int, Sequence[int]],
                card: str | Callable[[Any], str] | None = None, overwrite: bool = False, progress: bool = False,
                self_contained: bool = True, pad: bool = False) -> Path:
    """Write the pruned checkpoint (safetensors, the model's dtype) atomically to ``out_dir``.

    ``model`` is pruned in place first unless it already has the plan's counts (no second copy of the
    weights is ever made); a model accelerate offloaded is pruned and written one decoder layer at a time
    (``streaming.write_streamed``). Writes plan.json (for a ``Plan``) and README.md (``card``, or ``card(info)``
    of the pruned model) beside the weights.
    ``self_contained``: where layers differ in count, also write the checkpoint's own modelling code (``auto_map``,
    ``allocopt.serving.remote_code``) so that plain transformers loads it with ``trust_remote_code=True``.
    ``pad``: the exact padded export instead (``allocopt.serving.padding.pad_model``, applied here unless ``model`` is
    padded already): one expert count in every layer, loadable by stock transformers and vLLM; AllocoptError for
    families where it cannot be exact, or for an offloaded model (padding needs the weights in memory).
    """
    kept = plan.kept if isinstance(plan, Plan) else {int(l): tuple(k) for l, k in plan.items()}
    current = {b.layer: b.info.num_experts for b in find_moe_blocks(model)}
    streamed = is_offloaded(model)
    if pad:
        from allocopt.serving.padding import pad_model

        if streamed:
            raise AllocoptError("--pad needs the whole model in memory and this one is offloaded; export without --pad "
                                "(streamed, compact) or give it more memory (--max-memory)")
        width = max(len(kept.get(l, range(n))) for l, n in current.items())
        if any(n != width for n in current.values()):
            if isinstance(plan, Plan):
                plan.validate_for(describe(model))
            pad_model(model, kept)
    elif streamed:
        _validate(model, plan)
    elif any(current.get(l) != len(k) for l, k in kept.items()):
        prune_model(model, plan, progress=progress)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if streamed:
            write_streamed(model, {l: list(k) for l, k in kept.items()}, tmp, progress=progress)
            _record_counts(model, find_moe_blocks(model)[0].family)
            model.config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        if self_contained:
            from allocopt.serving.remote_code import write_modeling_code

            write_modeling_code(model, tmp)
        if callable(card):                         # a streamed model's offloaded copy is the unpruned one: no fingerprint
            card = card(describe(model, fingerprint=not streamed))
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


def load_pruned(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu", **placement: Any) -> nn.Module:
    """Load an allocopt checkpoint with the stock transformers class, strictly: any missing, unexpected or
    mis-shaped weight is an error (a silently re-initialised expert would be a different model).
    ``placement``: transformers' ``device_map``/``max_memory``/``offload_folder`` (the model then stays where
    accelerate put it instead of moving to ``device``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AllocoptError(f"{path} has no config.json; pass a directory written by `allocopt prune`")
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    cls = pruned_class(_stock_class(config, path))
    model = strict_from_pretrained(cls.from_pretrained, path, config, dtype=dtype, **placement)
    return (model if placement else model.to(device)).eval()


def strict_from_pretrained(load: Any, path: Path, config: Any, **kwargs: Any) -> nn.Module:
    """``load(path, config=config, ...)`` (a ``from_pretrained``) that refuses a checkpoint which does not match its
    config: transformers re-initialises missing weights with a warning only, which would be a different model."""
    try:
        model, report = load(path, config=config, dtype=kwargs.pop("dtype", None) or "auto", use_safetensors=True,
                             output_loading_info=True, **kwargs)
    except RuntimeError as exc:          # transformers refuses mis-shaped weights itself
        raise AllocoptError(f"checkpoint {path} does not match its config ({str(exc).splitlines()[0][:200]}); "
                            f"{_fix_for(path, config)}") from exc
    except ValueError as exc:
        if "offload_folder" not in str(exc):
            raise
        raise AllocoptError("--max-memory leaves some weights for the disk but no --offload-dir was given; pass "
                            "--offload-dir DIR (a folder with room for the weights that do not fit)") from exc
    problems = {k: sorted(v) for k, v in report.items() if v and k != "error_msgs"}
    if problems:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}" for k, v in problems.items())
        raise AllocoptError(f"checkpoint {path} does not match its config ({detail}); {_fix_for(path, config)}")
    return model


def _fix_for(path: Path, config: Any) -> str:
    """What to do about a checkpoint whose weights and config disagree."""
    if (path / PLAN_FILE).is_file() and getattr(config, LAYER_COUNTS_FIELD, None) is None:
        return (f"it looks like an allocopt export whose config.json lost \"{LAYER_COUNTS_FIELD}\" (its {PLAN_FILE} lists the "
                "kept experts): re-export it with `allocopt prune`")
    if getattr(config, LAYER_COUNTS_FIELD, None) is not None:
        return "re-export it with `allocopt prune`"
    return "the checkpoint is incomplete or damaged: copy it again from its source"
