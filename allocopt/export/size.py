"""What a pruned export weighs, computed by the code that writes it: a budget in bytes (``--memory``) is a budget on this.

The export of a plan is the model pruned by ``prune_model`` and saved; its tensors are the pruned model's persistent
state (tied weights once). :func:`export_size` prunes a twin of the model on the meta device (no weights, the
model's own dtypes) twice and reads off, per MoE layer, the bytes one kept routed expert adds (its weights, its
router row, its selection-bias entry) and the bytes no plan changes (embeddings, attention, shared experts, norms).
Both are checked to be linear in the kept count, so :meth:`ExportSize.bytes` of any plan is the byte count of its
export's tensors (safetensors headers aside). With bit-widths (``--bits``) it also holds, per layer and bit-width,
what one kept expert's matrices weigh packed (``export.quantized``: the compressor the export runs, on meta tensors).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.export.mtp import mtp_bytes
from allocopt.models import find_moe_blocks, prune_model
from allocopt.models.adapter import decoder_layers


@dataclass(frozen=True)
class ExportSize:
    """``bytes(counts, bits) = base + sum_l counts[l] * (per_expert[l] + quantized[l][bits[l]])``: the export's tensor
    bytes for per-layer kept counts (layers absent from ``counts`` keep all their experts) and bit-widths (layers
    absent from ``bits`` stay at the checkpoint's precision)."""

    base: int
    per_expert: Mapping[int, int]        # MoE layer index -> bytes one kept routed expert adds to the export
    num_experts: Mapping[int, int]
    quantized: Mapping[int, Mapping[int, int]] = field(default_factory=dict)   # layer -> bits -> bytes per expert
                                                                               # packed minus unpacked (< 0)

    @property
    def full(self) -> int:
        """The unpruned export's tensor bytes."""
        return self.bytes({})

    def bytes(self, counts: Mapping[int, int], bits: Mapping[int, int] | None = None) -> int:
        bits = bits or {}
        return self.base + sum(int(counts.get(l, n)) * self.expert_bytes(l, bits.get(l))
                               for l, n in self.num_experts.items())

    def expert_bytes(self, layer: int, bits: int | None = None) -> int:
        """Bytes one kept routed expert of ``layer`` adds to the export at ``bits`` (None: the checkpoint's precision)."""
        if bits is None:
            return self.per_expert[layer]
        if bits not in self.quantized.get(layer, {}):
            raise AllocoptError(f"layer {layer} was not sized at {bits} bits; size the export with those bits "
                                "(export_size(model, bits=...))")
        return self.per_expert[layer] + self.quantized[layer][bits]

    def kept_for(self, memory: int, unit: int = 1, prunable: Mapping[int, bool] | None = None) -> int:
        """The most routed experts kept in all, layers no plan can change (``prunable`` False: hash-routed ones)
        included, whose export fits in ``memory`` bytes, the prunable layers' share a multiple of ``unit``; -1 when
        not even the parts no plan changes fit. Needs one expert size over the prunable layers (default all);
        AllocoptError otherwise."""
        sizes = {self.per_expert[l] for l in self.num_experts if prunable is None or prunable[l]}
        if len(sizes) != 1:
            raise AllocoptError(f"this model's MoE layers have experts of different sizes ({sorted(sizes)} bytes), so a "
                                "byte budget is not an expert count; give --sparsity or --keep instead")
        whole = [l for l in self.num_experts if prunable is not None and not prunable[l]]
        fixed = self.base + sum(self.num_experts[l] * self.per_expert[l] for l in whole)
        if memory < fixed:
            return -1
        movable = sum(self.num_experts.values()) - sum(self.num_experts[l] for l in whole)
        per = sizes.pop()
        kept = min(movable, unit * math.floor((memory - fixed) / (per * unit)))
        return kept + sum(self.num_experts[l] for l in whole)


def export_size(model: nn.Module, bits: tuple[int, ...] = (), scheme=None) -> ExportSize:
    """The export size model of ``model`` (loaded, offloaded or a meta skeleton), also at each of ``bits`` for the
    routed experts (``scheme``: their groups, default ``WeightScheme.for_model``); nothing is allocated."""
    blocks = find_moe_blocks(model)
    full, full_layers = _state_bytes(model)              # the unpruned export: the model's own tensors
    cut = {b.layer: _step(b) for b in blocks}           # experts removed per layer in the first prune (one per group)
    per_expert: dict[int, int] = {}
    probes = [{l: s for l, s in cut.items() if s}, {b.layer: b.info.num_experts - _floor(b) for b in blocks}]
    measured = []
    for removed in probes:
        twin = _twin(model)
        kept = {b.layer: _kept_ids(b, b.info.num_experts - removed.get(b.layer, 0)) for b in blocks}
        prune_model(twin, kept)
        measured.append(_state_bytes(twin)[1])
    for b in blocks:
        removed = cut[b.layer]
        per = (full_layers[b.layer] - measured[0][b.layer]) // removed if removed else 0
        if removed and per * removed != full_layers[b.layer] - measured[0][b.layer]:
            raise AllocoptError(f"layer {b.layer}'s export size is not a whole number of bytes per expert; a byte budget "
                                "cannot be used with this model (use --sparsity or --keep)")
        far = probes[1][b.layer]
        if full_layers[b.layer] - measured[1][b.layer] != far * per:
            raise AllocoptError(f"layer {b.layer}'s export size is not linear in its expert count; a byte budget cannot "
                                "be used with this model (use --sparsity or --keep)")
        per_expert[b.layer] = per
    num_experts = {b.layer: b.info.num_experts for b in blocks}
    base = full - sum(n * per_expert[l] for l, n in num_experts.items()) + mtp_bytes(model)   # MTP layers go whole
    quantized = {}
    if bits:
        from allocopt.export.quantized import quantized_expert_bytes
        from allocopt.models.quantization import WeightScheme, expert_weights

        list_name, _ = decoder_layers(model)
        quantized = quantized_expert_bytes(_twin(model), {l: f"{list_name}.{l}." for l in num_experts}, tuple(bits),
                                           scheme or WeightScheme.for_model(model),
                                           {b.layer: expert_weights(b) for b in blocks})
    return ExportSize(base, per_expert, num_experts, quantized)


def _twin(model: nn.Module) -> nn.Module:
    """``model``'s architecture on the meta device with each tensor in the model's dtype."""
    from allocopt.runtime.loading import instantiate

    with torch.device("meta"):
        twin = instantiate(copy.deepcopy(model.config))
    dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()}
    for name, tensor in twin.state_dict(keep_vars=True).items():
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = tensor.data.to(dtypes[name])
    return twin


def _state_bytes(model: nn.Module) -> tuple[int, dict[int, int]]:
    """Bytes of the persistent tensors (each object once: tied weights are written once) and per decoder layer."""
    list_name, layers = decoder_layers(model)
    seen: set[int] = set()
    total, per_layer = 0, {i: 0 for i in range(len(layers))}
    prefix = f"{list_name}."
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        n = tensor.numel() * tensor.element_size()
        total += n
        if name.startswith(prefix):
            index = name[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                per_layer[int(index)] += n
    return total, per_layer


def _groups(block) -> int:
    return max(1, int(block.info.groups or 1))


def _step(block) -> int:
    """Experts the first measuring prune removes from a layer: one per routing group, none where it cannot prune."""
    g = _groups(block)
    return g if block.info.num_experts - g >= block.info.min_kept else 0


def _floor(block) -> int:
    """The fewest experts a layer can keep, in whole routing groups."""
    g = _groups(block)
    return min(block.info.num_experts, g * math.ceil(block.info.min_kept / g))


def _kept_ids(block, count: int) -> list[int]:
    """``count`` expert ids spread evenly over the routing groups (what group-limited routing needs)."""
    g, n = _groups(block), block.info.num_experts
    return sorted(grp * (n // g) + j for grp in range(g) for j in range(count // g))
