"""Quantized routed experts in the export: compressed-tensors' pack-quantized format, per-layer bit-widths.

A plan with bits (``LayerPlan.bits``) is exported with each kept expert's weight matrices of a quantized layer stored
as compressed-tensors stores a W4A16/W8A16 ``Linear``: ``weight_packed`` (int32, 32 / bits values per word),
``weight_scale`` (one per group of input columns, in the weight's dtype) and ``weight_shape``; every other tensor
(routers, attention, shared experts, embeddings, experts of unquantized layers) is written as before. The values are
``models.quantization.quantize_matrix``'s, the ones ESAP scored, packed by compressed-tensors'
``PackedQuantizationCompressor``.

The same functions size the export: :func:`expert_matrices` names one kept expert's matrices as ``save_pretrained``
writes them (transformers' ``revert_weight_conversion`` on a meta twin) and :func:`compressed_bytes` runs the
compressor on meta tensors of their shapes, so a byte budget (``export.size``) counts exactly the tensors written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_json
from allocopt.models.quantization import WeightScheme, group_scales

_EXPERT_WEIGHT = re.compile(r"^(?P<head>.*\.layers\.(?P<layer>\d+)\..*\.experts\.)(?P<expert>\d+)\.(?P<proj>.+)\.weight$")
FORMAT = "pack-quantized"


def quantization_scheme(bits: int, scheme: WeightScheme, targets: list[str]):
    """compressed-tensors ``QuantizationScheme`` of the experts at ``bits`` (weight-only: W4A16 / W8A16)."""
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=scheme.args(bits))


def compress_weight(weight: torch.Tensor, bits: int, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """One expert matrix ``weight`` ([out, in]) -> the tensors its module stores (``weight_packed``,
    ``weight_scale``, ``weight_shape``). On the meta device only their shapes and dtypes (for sizing)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    if weight.device.type == "meta":
        groups = weight.shape[-1] // scheme.group_size
        scale = torch.empty((*weight.shape[:-1], groups), dtype=weight.dtype, device="meta")
    else:
        scale = group_scales(weight, bits, scheme)
    return PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scale},
                                                 quantization_scheme(bits, scheme, ["Linear"]))


def compressed_bytes(shape: tuple[int, ...], dtype: torch.dtype, bits: int, scheme: WeightScheme) -> int:
    """Bytes of :func:`compress_weight`'s tensors for a matrix of ``shape`` and ``dtype``."""
    tensors = compress_weight(torch.empty(shape, dtype=dtype, device="meta"), bits, scheme)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def expert_matrices(twin: nn.Module, layer_prefix: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(projection name, shape, dtype) of expert 0's weight matrices in the export of one MoE layer, as
    ``save_pretrained`` names them (``gate_proj``, ``up_proj``, ``down_proj`` for most families). ``twin``: the model
    on the meta device; ``layer_prefix``: e.g. ``model.layers.3.``."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: v for k, v in twin.state_dict().items() if k.startswith(layer_prefix)}
    out = []
    for name, t in revert_weight_conversion(twin, state).items():
        m = _EXPERT_WEIGHT.match(name)
        if m is not None and m["expert"] == "0" and t.dim() == 2:
            out.append((m["proj"], tuple(t.shape), t.dtype))
    return out


def quantized_expert_bytes(twin: nn.Module, layer_prefixes: Mapping[int, str], bits: tuple[int, ...],
                           scheme: WeightScheme, scored: Mapping[int, int]) -> dict[int, dict[int, int]]:
    """Per MoE layer and bit-width: bytes one kept expert's matrices take in the export minus what they take at the
    checkpoint's precision (negative: what quantizing saves per expert). ``scored``: weights per expert the scorer
    quantizes in each layer; an export whose per-expert matrices hold another number (experts fused on disk, as
    GPT-OSS stores them) is refused, since it would not store what was scored."""
    out: dict[int, dict[int, int]] = {}
    for layer, prefix in layer_prefixes.items():
        mats = expert_matrices(twin, prefix)
        written = sum(torch.Size(s).numel() for _, s, _ in mats)
        if written != scored[layer]:
            raise AllocoptError(f"layer {layer}'s checkpoint does not store its experts as one weight matrix per "
                                f"projection and expert ({written} of the {scored[layer]} weights per expert found), so "
                                "its experts cannot be exported quantized; drop --bits for this model")
        dense = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, s, d in mats)
        out[layer] = {b: sum(compressed_bytes(s, d, b, scheme) for _, s, d in mats) - dense for b in bits}
    return out


def quantization_config(bits: Mapping[int, int], scheme: WeightScheme, layers_path: str) -> dict:
    """config.json's ``quantization_config``: one compressed-tensors config group per bit-width, targeting the routed
    experts' projections of the layers stored at it (``layers_path``: e.g. ``model.layers``)."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = {}
    for i, b in enumerate(sorted(set(bits.values()), reverse=True)):
        layers = "|".join(str(l) for l in sorted(l for l, v in bits.items() if v == b))
        target = rf"re:^{re.escape(layers_path)}\.({layers})\..*\.experts\.\d+\.[^.]+$"
        groups[f"group_{i}"] = quantization_scheme(b, scheme, [target])
    config = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed", ignore=[])
    return config.model_dump(mode="json", exclude_none=True)


def write_quantized(out: Path, bits: Mapping[int, int], scheme: WeightScheme, layers_path: str,
                    max_shard_bytes: int = defaults.EXPORT_SHARD_BYTES) -> int:
    """Rewrite the export in ``out`` with the routed experts' weight matrices of each layer in ``bits`` packed at its
    bit-width (:func:`compress_weight`), every other tensor as written, and ``quantization_config`` in config.json.
    Returns the tensor bytes written."""
    from allocopt.export.streamed import ShardWriter, replace_shards
    from allocopt.runtime.converted import checkpoint_tensors
    from allocopt.runtime.offload import read_tensor

    exported = checkpoint_tensors(out)
    headers: dict = {}
    staging = out / ".quantized"
    staging.mkdir()
    writer = ShardWriter(staging, max_shard_bytes)
    for name in sorted(exported):
        value = read_tensor(str(out / exported[name]), name, headers)
        m = _EXPERT_WEIGHT.match(name)
        if m is not None and int(m["layer"]) in bits and value.dim() == 2:
            for suffix, tensor in sorted(compress_weight(value, bits[int(m["layer"])], scheme).items()):
                writer.add(name[: -len("weight")] + suffix, tensor)
        else:
            writer.add(name, value)
    writer.finish()
    replace_shards(out, staging)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config(bits, scheme, layers_path)
    atomic_write_json(out / "config.json", config)
    return writer.total


__all__ = ["FORMAT", "compress_weight", "compressed_bytes", "expert_matrices", "quantization_config",
           "quantization_scheme", "quantized_expert_bytes", "write_quantized"]
