"""Find the MoE blocks of any transformers MoE model and describe them as plain data.

Discovery is generic (spec transformers-moe A.1): decoder layers are the shortest-named ``ModuleList`` called
``layers``/``blocks``/``h``; a layer's MoE block is its first submodule with an ``experts`` child (or the
family's ``block_path``); the router is the block child ``gate``/``router`` (or a *Router/*Gate class), its
weight the parameter with one row per routed expert (plus the family's tail rows). ``families.py`` supplies
what discovery cannot see (router rule, config fields, selection-only biases, group-limited routing).

Example::

    info = describe(model)          # ModelInfo, JSON-able via info.to_json()
    info.num_experts, info.top_k    # {layer: E}, {layer: k}
"""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.models.families import GENERIC_COUNT_FIELDS, GENERIC_SHARED_COUNT_FIELDS, GENERIC_TOP_K_FIELDS, Family, family_for, is_known
from allocopt.models.hooks import onloaded
from allocopt.models.identity import fingerprint as identity_fingerprint
from allocopt.models.routing import RoutingParams, config_value, group_floor

_LAYER_LIST_NAMES = ("layers", "blocks", "h")
_ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class MoELayerInfo:
    index: int                       # decoder-layer index (dense layers have no entry)
    path: str                        # module path of the MoE block, e.g. "model.layers.1.mlp"
    num_experts: int                 # routed experts (zero/identity and skip experts are not counted)
    top_k: int
    num_shared_experts: int
    router_rule: str
    selection_bias: bool             # a bias used only to choose experts (masked with -inf too)
    storage: str                     # "fused" | "modulelist" | "flattened" | "parallel"
    bytes_per_expert: int
    groups: int = 1                  # group-limited routing: experts per layer form this many equal groups
    min_kept: int = 0                # fewest experts the router routes exactly with (>= top_k)

    @property
    def routing_note(self) -> str:
        """Why ``min_kept``/``groups`` constrain a plan, in words (empty when they do not)."""
        if self.min_kept >= self.num_experts:
            return "routed by a token-id table that names every expert, so all its experts stay"
        if self.groups > 1:
            size = self.num_experts // self.groups
            return (f"group-limited routing ({self.groups} groups of {size}, {self.router_rule}): every group keeps "
                    f"the same number of experts, at least {self.min_kept // self.groups}")
        return ""


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

    @property
    def min_kept(self) -> dict[int, int]:
        return {l.index: max(l.top_k, l.min_kept) for l in self.layers}

    @property
    def unit(self) -> int:
        """Experts per allocation step: a common multiple of every layer's group count (1 without groups)."""
        import math

        return math.lcm(*(l.groups for l in self.layers)) if self.layers else 1

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
    family: Family
    config: Any                      # the (text) config the block was built from
    params: RoutingParams
    router_rows: int                 # rows of the router weight: routed experts + tail
    tail: int = 0                    # router rows after the routed ones (shared/skip/zero experts)

    @property
    def router_weight(self) -> nn.Parameter:
        return _router_weight(self.router, self.block, self.path, self.family)

    def selection_biases(self, family: Family | None = None) -> list[torch.Tensor]:
        """Selection-only bias tensors of this block (e.g. ``gate.e_score_correction_bias``)."""
        family = family or self.family
        return [t for p in family.selection_bias_paths if (t := _get_path(self.block, p)) is not None]

    def choice_bias(self) -> torch.Tensor | None:
        biases = self.selection_biases()
        return biases[0] if biases else None

    @property
    def hash_routed(self) -> bool:
        if self.family.hash_layers is None:
            return False
        kinds = config_value(self.config, self.family.hash_layers[0]) or []
        return self.layer < len(kinds) and kinds[self.layer] == self.family.hash_layers[1]

    def hash_table(self) -> torch.Tensor | None:
        """The token-id -> expert-ids table of a hash-routed layer (DeepSeek-V4 ``gate.tid2eid``)."""
        if not self.hash_routed:
            return None
        tables = [b for b in self.router.buffers() if b.dtype in (torch.int32, torch.int64) and b.dim() == 2]
        return tables[0] if tables else None

    def per_expert_scale(self, params: RoutingParams | None = None) -> torch.Tensor | None:
        """A learned multiplier on the weights: per expert (Gemma-4) or one scalar (Inkling ``global_scale``)."""
        params = params or self.params
        scale = None
        for name in params.scale_params:
            t = _get_path(self.router, name)
            if t is not None:
                t = t.detach().float().reshape(-1)
                scale = t if scale is None else scale * t
        return scale


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


def text_config(model: nn.Module) -> Any:
    """The config the decoder was built from (the text config of a multimodal model)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


PRUNING_KEEPS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")   # what expert pruning never changes


def pruning_mismatch(full: nn.Module, pruned: nn.Module, planned: Mapping[int, int] | None = None) -> str | None:
    """Why ``pruned`` cannot be a pruned copy of ``full``, in words, or None where it can be: another model type,
    vocabulary, hidden size or layer count (what expert pruning keeps), other MoE layers, a layer holding more routed
    experts than ``full``'s, or fewer than ``planned`` (decoder-layer index -> experts its plan keeps: a compact export
    holds exactly those, a padded one more). Config fields a model does not state are not compared."""
    a, b = text_config(full), text_config(pruned)
    for name in PRUNING_KEEPS:
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x is not None and y is not None and x != y:
            return f"its {name} is {y}, the full model's {x}"
    have = {blk.info.index: blk.info.num_experts for blk in find_moe_blocks(pruned)}
    full_counts = {blk.info.index: blk.info.num_experts for blk in find_moe_blocks(full)}
    if sorted(have) != sorted(full_counts):
        return f"its MoE layers are {sorted(have)}, the full model's {sorted(full_counts)}"
    for layer, n in have.items():
        if n > full_counts[layer]:
            return f"its layer {layer} holds {n} routed experts, more than the full model's {full_counts[layer]}"
        if planned is not None and layer in planned and n < planned[layer]:
            return f"its layer {layer} holds {n} routed experts, fewer than the {planned[layer]} its plan keeps"
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES
             and not any(part in name for part in ("vision", "visual", "audio"))]
    if not found:
        raise AllocoptError(f"{type(model).__name__} has no decoder-layer list (no ModuleList named layers/blocks/h); "
                            "allocopt needs a transformers decoder-only MoE model")
    return min(found, key=lambda nm: len(nm[0]))


def _moe_submodule(layer: nn.Module, family: Family) -> tuple[str, nn.Module] | None:
    if family.block_path is not None:
        try:
            return family.block_path, layer.get_submodule(family.block_path)
        except AttributeError:
            return None
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
        if type(child).__name__.endswith(("Router", "Gate", "Gating")):
            return child
    return None


def _router_weight(router: nn.Module, block: nn.Module, path: str, family: Family) -> nn.Parameter:
    if family.router_weight is not None:
        t = _get_path(router, family.router_weight)
        if isinstance(t, nn.Parameter):
            return t
    hidden = _hidden_size(block)
    for p in router.parameters():
        if p.dim() == 2 and (hidden is None or p.shape[1] == hidden):
            return p
    raise AllocoptError(f"the router of {path} ({type(router).__name__}) has no 2-D weight; this MoE layout is not supported")


def _hidden_size(block: nn.Module) -> int | None:
    experts = block._modules.get("experts")
    return getattr(experts, "hidden_dim", None) or getattr(experts, "hidden_size", None)


def _tail(family: Family, config: Any) -> int:
    if family.router_tail is None:
        return 0
    return int(config_value(config, family.tail_field) or 0) if family.tail_field else 1


def _experts_module(block: nn.Module, family: Family) -> nn.Module:
    """The module whose tensors hold the routed experts (the block itself for JetMoE's parallel experts)."""
    return block if family.experts_call == "parallel" else block._modules["experts"]


def expert_tensors(experts: nn.Module, num_experts: int, tail: int, layout: str, exclude: set[int] = frozenset()
                   ) -> list[tuple[str, torch.Tensor, int]]:
    """``(name, tensor, rows)`` of every tensor stacked per expert: ``rows`` is E (or E + tail for tensors that
    also hold the zero experts); for the flattened layout a tensor of E*I rows is stacked per expert too."""
    out = []
    for name, t in list(experts.named_parameters()) + list(experts.named_buffers()):
        if id(t) in exclude or t.dim() < 1:
            continue
        if t.shape[0] in (num_experts, num_experts + tail) and (t.shape[0] == num_experts or tail):
            out.append((name, t, int(t.shape[0])))
        elif layout == "flattened" and t.dim() == 2 and t.shape[0] % num_experts == 0 and t.shape[0] > num_experts:
            out.append((name, t, num_experts))
    return out


def _storage_and_bytes(experts: nn.Module, num_experts: int, tail: int, family: Family, exclude: set[int]
                       ) -> tuple[str, int]:
    if isinstance(experts, nn.ModuleList):
        first = experts[0]
        return "modulelist", sum(t.numel() * t.element_size() for t in list(first.parameters()) + list(first.buffers()))
    stacked = expert_tensors(experts, num_experts, tail, family.expert_layout, exclude)
    if not stacked:
        raise AllocoptError(f"{type(experts).__name__} stores no per-expert tensors along dim 0; this expert layout is "
                            "not supported (add a row with its expert_layout to allocopt/models/families.py)")
    storage = {"flattened": "flattened", "stacked": "fused"}[family.expert_layout]
    if family.experts_call == "parallel":
        storage = "parallel"
    per_expert = sum(t.numel() * t.element_size() // rows for _, t, rows in stacked)
    return storage, per_expert


def _layer_value(value: Any, layer: int) -> Any:
    return value[layer] if isinstance(value, (list, tuple)) and layer < len(value) else value


def _top_k(config: Any, family: Family, router: nn.Module, block: nn.Module, layer: int, model: nn.Module) -> int:
    for owner in (router, block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    for name in ((family.top_k_field,) if family.top_k_field else GENERIC_TOP_K_FIELDS):
        k = _layer_value(config_value(config, name), layer)
        if isinstance(k, int):
            return k
    raise AllocoptError(f"cannot tell the top-k of {type(model).__name__} (no config field {family.top_k_field or ', '.join(GENERIC_TOP_K_FIELDS)}); "
                        "add a row for this model_type to allocopt/models/families.py")


def _num_shared(config: Any, family: Family, block: nn.Module, layer: nn.Module) -> int:
    """Shared experts sit on the MoE block (Qwen2, DeepSeek) or beside it on the decoder layer (GraniteMoeShared).
    One module may fuse several (DeepSeek's ``n_shared_experts`` widen one MLP); then the count is the config's."""
    present = [a for a in family.shared_expert_attrs
               if any(isinstance(getattr(owner, a, None), nn.Module) for owner in (block, layer))]
    if not present:
        return 0
    fields = (family.shared_count_field,) if family.shared_count_field else \
        (() if is_known(family.model_type) else GENERIC_SHARED_COUNT_FIELDS)
    for name in fields:
        n = config_value(config, name)
        if isinstance(n, int) and n > 0:
            return n
    return len(present)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks in decoder-layer order; raises AllocoptError for dense, unsupported or unrecognised models."""
    cached = _CACHE.get(model)
    if cached is not None:
        return cached
    list_name, layers = decoder_layers(model)
    config = text_config(model)
    model_type = getattr(model.config, "model_type", "") or ""
    family = family_for(model_type)
    if family.unsupported:
        raise AllocoptError(f"{type(model).__name__} ({model_type}) cannot be pruned by expert: {family.unsupported}")
    blocks: list[MoEBlock] = []
    for i, layer in enumerate(layers):
        found = _moe_submodule(layer, family)
        if found is None:
            continue
        sub, block = found
        path = ".".join(p for p in (list_name, str(i), sub) if p)
        router = _find_router(block)
        if router is None:
            raise AllocoptError(f"{type(model).__name__}: the MoE block {path} has no router child (gate/router); "
                                "this MoE layout is not supported")
        weight = _router_weight(router, block, path, family)
        rows, tail = int(weight.shape[0]), _tail(family, config)
        n = rows - tail
        experts = _experts_module(block, family)
        exclude = {id(t) for t in list(router.parameters()) + list(router.buffers())}
        storage, per_expert = _storage_and_bytes(experts, n, tail, family, exclude)
        top_k = _top_k(config, family, router, block, i, model)
        params = RoutingParams.resolve(family.rule, config, top_k, family.group_fields)
        groups, per_group = group_floor(family.rule, params)
        info = MoELayerInfo(index=i, path=path, num_experts=n, top_k=top_k,
                            num_shared_experts=_num_shared(config, family, block, layer),
                            router_rule=family.rule.name(params) if family.rule.score != "unknown" else "unknown",
                            selection_bias=any(_get_path(block, p) is not None for p in family.selection_bias_paths),
                            storage=storage, bytes_per_expert=per_expert, groups=groups,
                            min_kept=max(top_k, groups * per_group))
        b = MoEBlock(i, path, block, router, experts, info, family, config, params, rows, tail)
        if b.hash_routed:                       # experts chosen by a token-id table: nothing can be removed
            rule = replace(family.rule, select="hash", bias_on=None)
            b = replace(b, family=replace(family, rule=rule), info=replace(info, min_kept=n, router_rule=rule.name(params)))
        blocks.append(b)
    if not blocks:
        raise AllocoptError(f"{type(model).__name__} has no MoE block (no submodule with an `experts` child in {list_name}); "
                            "allocopt needs a sparse MoE model")
    if not is_known(model_type):
        blocks = _with_inferred_rules(model, blocks)
    _CACHE[model] = blocks
    return blocks


def _with_inferred_rules(model: nn.Module, blocks: list[MoEBlock]) -> list[MoEBlock]:
    """A type outside the table: its rule is the simplest candidate that reproduces the real router (or unknown)."""
    from allocopt.models.router_probe import infer

    if any(p.device.type == "meta" for p in model.parameters()):
        return blocks
    rules = infer(model, blocks)
    out = []
    for b in blocks:
        rule = rules.get(b.layer)
        if rule is None:
            out.append(b)
            continue
        groups_fields = ("n_group", "topk_group")
        params = RoutingParams.resolve(rule, b.config, b.info.top_k, groups_fields)
        groups, per_group = group_floor(rule, params)
        family = replace(b.family, rule=rule, group_fields=groups_fields)
        info = replace(b.info, router_rule=rule.name(params) + " (inferred)", groups=groups,
                       min_kept=max(b.info.top_k, groups * per_group, b.info.min_kept))
        out.append(replace(b, family=family, params=params, info=info))
    return out


def _owner(root: nn.Module, tensor: torch.Tensor) -> nn.Module:
    """The submodule of ``root`` that holds ``tensor`` directly."""
    for m in root.modules():
        if any(t is tensor for t in m.parameters(recurse=False)):
            return m
    return root


def model_fingerprint(model: nn.Module, blocks: list[MoEBlock] | None = None) -> str:
    """The model's identity (``allocopt.models.identity``): sha256 of its structure, config, weight dtypes and every
    tensor of its checkpoint (read from the safetensors files, cached per machine, when ``load_model`` loaded it;
    else from the tensors in memory, in the layout ``save_pretrained`` writes). Stable across save/reload of the
    same weights; different for any other weights, dtype or config."""
    blocks = find_moe_blocks(model) if blocks is None else blocks
    structure = {"architecture": type(model).__name__, "num_layers": len(decoder_layers(model)[1]),
                 "experts": {str(b.layer): b.info.num_experts for b in blocks}}
    return identity_fingerprint(model, structure)


def legacy_fingerprint(model: nn.Module, blocks: list[MoEBlock] | None = None) -> str:
    """The fingerprint scheme before ``allocopt.models.identity``: config essentials and the router weights (as
    fp32) only, blind to experts. Kept only to tell a study or plan made with it from one made for another model."""
    blocks = find_moe_blocks(model) if blocks is None else blocks
    config = text_config(model)
    essentials = {"architecture": type(model).__name__, "num_layers": len(decoder_layers(model)[1]),
                  "experts": {b.layer: b.info.num_experts for b in blocks},
                  "hidden_size": getattr(config, "hidden_size", None), "vocab_size": getattr(config, "vocab_size", None)}
    h = hashlib.sha256(json.dumps(essentials, sort_keys=True).encode())
    with torch.no_grad():
        for b in blocks:
            owner = _owner(b.router, b.router_weight)
            with onloaded(owner):                    # an offloaded router's weight comes back from CPU or disk
                w = b.router_weight.detach()
                if w.device.type == "meta":
                    raise AllocoptError("cannot fingerprint a model whose weights are still on the meta device; load it fully first")
                h.update(w.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(model: nn.Module, fingerprint: bool = True) -> ModelInfo:
    """Per-MoE-layer facts (experts, top-k, shared experts, router rule, storage, bytes) as frozen data.
    ``fingerprint=False`` describes a skeleton on the meta device (the fingerprint is then empty)."""
    blocks = find_moe_blocks(model)
    first = next(model.parameters())
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return ModelInfo(model_type=getattr(model.config, "model_type", "") or "", architecture=type(model).__name__,
                     num_decoder_layers=len(decoder_layers(model)[1]), layers=tuple(b.info for b in blocks),
                     fingerprint=model_fingerprint(model, blocks) if fingerprint else "",
                     dtype=str(first.dtype).removeprefix("torch."),
                     total_bytes=total, expert_bytes=sum(b.info.num_experts * b.info.bytes_per_expert for b in blocks))


__all__ = ["GENERIC_COUNT_FIELDS", "MoEBlock", "MoELayerInfo", "ModelInfo", "decoder_layers", "describe",
           "expert_tensors", "find_moe_blocks", "invalidate", "legacy_fingerprint", "model_fingerprint", "text_config"]
