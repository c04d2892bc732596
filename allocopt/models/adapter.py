"""Find the MoE blocks of any fused-experts transformers model and describe them as plain data.

Discovery is generic (spec transformers-moe A.1): decoder layers are the shortest-named ``ModuleList``
called ``layers``/``blocks``/``h``; a layer's MoE block is its first submodule with an ``experts`` child;
the router is the block child ``gate``/``router`` (or a *Router/*Gate class). ``families.py`` supplies the
semantics discovery cannot see (router rule, config fields, selection-only biases).

Example::

    info = describe(model)          # ModelInfo, JSON-able via info.to_json()
    info.num_experts, info.top_k    # {layer: E}, {layer: k}
"""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.models.families import Family, family_for

_LAYER_LIST_NAMES = ("layers", "blocks", "h")
_ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class MoELayerInfo:
    index: int                       # decoder-layer index (dense layers have no entry)
    path: str                        # module path of the MoE block, e.g. "model.layers.1.mlp"
    num_experts: int
    top_k: int
    num_shared_experts: int
    router_rule: str
    selection_bias: bool             # a bias used only to choose experts (masked with -inf too)
    storage: Literal["fused", "modulelist"]
    bytes_per_expert: int


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    architecture: str
    num_decoder_layers: int
    layers: tuple[MoELayerInfo, ...]
    fingerprint: str
    dtype: str
    total_bytes: int
    expert_bytes: int

    @property
    def num_experts(self) -> dict[int, int]:
        return {l.index: l.num_experts for l in self.layers}

    @property
    def top_k(self) -> dict[int, int]:
        return {l.index: l.top_k for l in self.layers}

    @property
    def bytes_per_expert(self) -> dict[int, int]:
        return {l.index: l.bytes_per_expert for l in self.layers}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(l) for l in self.layers]
        return out


@dataclass(frozen=True)
class MoEBlock:
    layer: int
    path: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    info: MoELayerInfo

    @property
    def router_weight(self) -> nn.Parameter:
        return _router_weight(self.router, self.block, self.path)

    def selection_biases(self, family: Family) -> list[torch.Tensor]:
        """Selection-only bias tensors of this block (e.g. ``gate.e_score_correction_bias``)."""
        return [t for p in family.selection_bias_paths if (t := _get_path(self.block, p)) is not None]


# Discovery walks every module; masking runs it thousands of times, so results are cached per model
# and dropped whenever ``export.prune_model`` changes the structure.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, list[MoEBlock]]" = weakref.WeakKeyDictionary()


def invalidate(model: nn.Module) -> None:
    _CACHE.pop(model, None)


def _get_path(root: nn.Module, path: str) -> torch.Tensor | None:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES]
    if not found:
        raise AllocoptError(f"{type(model).__name__} has no decoder-layer list (no ModuleList named layers/blocks/h); "
                            "allocopt needs a transformers decoder-only MoE model")
    return min(found, key=lambda nm: len(nm[0]))


def _moe_submodule(layer: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in layer.named_modules():
        experts = getattr(m, "_modules", {}).get("experts")
        if isinstance(experts, nn.Module):
            return name, m
    return None


def _find_router(block: nn.Module) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        if isinstance(block._modules.get(name), nn.Module):
            return block._modules[name]
    for child in block.children():
        if type(child).__name__.endswith(("Router", "Gate")):
            return child
    return None


def _router_weight(router: nn.Module, block: nn.Module, path: str) -> nn.Parameter:
    hidden = _hidden_size(block)
    for p in router.parameters():
        if p.dim() == 2 and (hidden is None or p.shape[1] == hidden):
            return p
    raise AllocoptError(f"the router of {path} ({type(router).__name__}) has no 2-D weight; this MoE layout is not supported")


def _hidden_size(block: nn.Module) -> int | None:
    experts = block._modules["experts"]
    return getattr(experts, "hidden_dim", None) or getattr(experts, "hidden_size", None)


def _num_experts(experts: nn.Module, router_rows: int) -> int:
    n = getattr(experts, "num_experts", None)
    if isinstance(n, int):
        return n
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return router_rows


def _expert_tensors(experts: nn.Module, num_experts: int) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers stacked along dim 0 per expert (fused storage)."""
    return [(n, t) for n, t in list(experts.named_parameters(recurse=False)) + list(experts.named_buffers(recurse=False))
            if t.dim() >= 1 and t.shape[0] == num_experts]


def _storage_and_bytes(experts: nn.Module, num_experts: int) -> tuple[str, int]:
    if isinstance(experts, nn.ModuleList):
        first = experts[0]
        return "modulelist", sum(t.numel() * t.element_size() for t in list(first.parameters()) + list(first.buffers()))
    fused = _expert_tensors(experts, num_experts)
    if not fused:
        raise AllocoptError(f"{type(experts).__name__} stores no per-expert tensors along dim 0; this expert layout is not supported")
    return "fused", sum(t.numel() * t.element_size() for _, t in fused) // num_experts


def _top_k(model: nn.Module, family: Family, router: nn.Module, block: nn.Module) -> int:
    for owner in (router, block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    k = getattr(model.config, family.top_k_field, None)
    if not isinstance(k, int):
        raise AllocoptError(f"cannot tell the top-k of {type(model).__name__} (no config.{family.top_k_field}); "
                            "add a row for this model_type to allocopt/models/families.py")
    return k


def _num_shared(model: nn.Module, family: Family, block: nn.Module, layer: nn.Module) -> int:
    """Shared experts sit on the MoE block (Qwen2, DeepSeek) or beside it on the decoder layer (GraniteMoeShared)."""
    present = [a for a in family.shared_expert_attrs
               if any(isinstance(getattr(owner, a, None), nn.Module) for owner in (block, layer))]
    if not present:
        return 0
    if family.shared_count_field is not None:
        return int(getattr(model.config, family.shared_count_field, 1) or 1)
    return len(present)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks in decoder-layer order; raises AllocoptError for dense or unrecognised models."""
    cached = _CACHE.get(model)
    if cached is not None:
        return cached
    list_name, layers = decoder_layers(model)
    config = getattr(model, "config", None)
    family = family_for(getattr(config, "model_type", "") or "")
    blocks: list[MoEBlock] = []
    for i, layer in enumerate(layers):
        found = _moe_submodule(layer)
        if found is None:
            continue
        sub, block = found
        path = ".".join(p for p in (list_name, str(i), sub) if p)
        router = _find_router(block)
        if router is None:
            raise AllocoptError(f"{type(model).__name__}: the MoE block {path} has no router child (gate/router); "
                                "this MoE layout is not supported")
        experts = block._modules["experts"]
        rows = _router_weight(router, block, path).shape[0]
        n = _num_experts(experts, rows)
        storage, per_expert = _storage_and_bytes(experts, n)
        info = MoELayerInfo(index=i, path=path, num_experts=n, top_k=_top_k(model, family, router, block),
                            num_shared_experts=_num_shared(model, family, block, layer), router_rule=family.rule(config),
                            selection_bias=any(_get_path(block, p) is not None for p in family.selection_bias_paths),
                            storage=storage, bytes_per_expert=per_expert)
        blocks.append(MoEBlock(i, path, block, router, experts, info))
    if not blocks:
        raise AllocoptError(f"{type(model).__name__} has no MoE block (no submodule with an `experts` child in {list_name}); "
                            "allocopt needs a sparse MoE model")
    _CACHE[model] = blocks
    return blocks


def model_fingerprint(model: nn.Module, blocks: list[MoEBlock] | None = None) -> str:
    """sha256 of the config essentials and the router weights (as fp32, so the dtype a model is loaded in
    does not matter): stable across save/reload, different for other weights or other expert counts."""
    blocks = find_moe_blocks(model) if blocks is None else blocks
    config = model.config
    essentials = {"architecture": type(model).__name__, "num_layers": len(decoder_layers(model)[1]),
                  "experts": {b.layer: b.info.num_experts for b in blocks},
                  "hidden_size": getattr(config, "hidden_size", None), "vocab_size": getattr(config, "vocab_size", None)}
    h = hashlib.sha256(json.dumps(essentials, sort_keys=True).encode())
    with torch.no_grad():
        for b in blocks:
            w = b.router_weight.detach()
            if w.device.type == "meta":
                raise AllocoptError("cannot fingerprint a model whose weights are still on the meta device; load it fully first")
            h.update(w.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(model: nn.Module) -> ModelInfo:
    """Per-MoE-layer facts (experts, top-k, shared experts, router rule, storage, bytes) as frozen data."""
    blocks = find_moe_blocks(model)
    first = next(model.parameters())
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return ModelInfo(model_type=getattr(model.config, "model_type", "") or "", architecture=type(model).__name__,
                     num_decoder_layers=len(decoder_layers(model)[1]), layers=tuple(b.info for b in blocks),
                     fingerprint=model_fingerprint(model, blocks), dtype=str(first.dtype).removeprefix("torch."),
                     total_bytes=total, expert_bytes=sum(b.info.num_experts * b.info.bytes_per_expert for b in blocks))
