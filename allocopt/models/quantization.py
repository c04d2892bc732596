"""Weight-only integer quantization of routed experts, the way the export stores them (issue #23).

The scheme is compressed-tensors' (the format vLLM serves as W8A16/W4A16 and llm-compressor writes): symmetric int
weights, one scale per group of ``group_size`` consecutive input columns of each output row, round-to-nearest. The
scales come from ``compressed_tensors.quantization.utils.calculate_qparams`` on each group's min/max and the values
from its ``quantize``/``dequantize``, so what ESAP scores is exactly what ``allocopt prune`` packs and writes: the exported
integers dequantize to the same tensors (checked in ``tests/test_quantization.py``).

A layer's quantized experts do not depend on which of its experts are kept (every row group belongs to one
expert), so each (layer, bits) is quantized once per model and cached; :func:`quantize_experts` swaps the cached
tensors in for a forward and back out, which costs nothing per candidate.

Example::

    scheme = WeightScheme.for_model(model)                  # group size that divides every expert's input width
    with quantize_experts(model, {3: 4, 5: 8}, scheme):     # MoE layers 3 and 5 at int4 and int8
        logits = model(ids).logits
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.models.adapter import MoEBlock, expert_tensors, find_moe_blocks
from allocopt.plan import SUPPORTED_BITS, check_bits


@dataclass(frozen=True)
class WeightScheme:
    """Symmetric int weight-only, group-wise: ``group_size`` input columns share one scale (scale dtype = the
    weight's dtype, no zero point). The bit-width is per layer and given separately."""

    group_size: int = defaults.QUANT_GROUP_SIZE

    def args(self, bits: int):
        """compressed-tensors ``QuantizationArgs`` of this scheme at ``bits``."""
        from compressed_tensors.quantization import QuantizationArgs

        check_bits([bits])
        return QuantizationArgs(num_bits=int(bits), type="int", symmetric=True, strategy="group",
                                group_size=self.group_size)

    @classmethod
    def for_model(cls, model: nn.Module, group_size: int = defaults.QUANT_GROUP_SIZE) -> "WeightScheme":
        """The largest power-of-two group size up to ``group_size`` that divides the input width of every routed
        expert matrix of ``model`` (Marlin-style kernels take 32, 64 and 128; tiny models have narrow experts)."""
        widths = {int(t.shape[-1]) for b in find_moe_blocks(model) for _, t in _expert_matrices(b)}
        if not widths:
            raise AllocoptError("this model's routed experts hold no weight matrices to quantize; drop --bits")
        g = 1 << int(math.log2(max(1, group_size)))
        while g > 1 and any(w % g for w in widths):
            g //= 2
        if g < 8:
            raise AllocoptError(f"the routed experts' input widths {sorted(widths)} share no group size of 8 or more up to "
                                f"{group_size}; drop --bits for this model")
        return cls(g)


def _expert_matrices(block: MoEBlock) -> list[tuple[str, torch.Tensor]]:
    """The routed experts' weight matrices of a block: stacked ``[E, out, in]`` parameters (biases and other 1-D or
    2-D per-expert tensors stay at full precision)."""
    if isinstance(block.experts, nn.ModuleList):
        raise AllocoptError(f"layer {block.layer} keeps its experts as a module list; --bits supports stacked experts "
                            "(the layout transformers uses for this family's fast path) only")
    stacked = expert_tensors(block.experts, block.info.num_experts, block.tail, block.family.expert_layout)
    return [(n, t) for n, t, rows in stacked if t.dim() == 3 and rows == block.info.num_experts and t.is_floating_point()]


def expert_weights(block: MoEBlock) -> int:
    """Weights one routed expert of ``block`` has in the matrices the scorer quantizes."""
    return sum(t[0].numel() for _, t in _expert_matrices(block))


def quantize_matrix(weight: torch.Tensor, bits: int, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN quantization of ``weight`` ([..., out, in]) -> (int values [..., out, in] as int8, scales
    [..., out, in / group] in the weight's dtype, the dequantized weight [..., out, in] in the weight's dtype)."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    shape, args = weight.shape, scheme.args(bits)
    scale, zero = _group_qparams(weight, bits, scheme)
    rows = weight.detach().reshape(-1, shape[-1])
    q = quantize(rows, scale, zero, args, dtype=torch.int8)
    deq = dequantize(q, scale, zero, args=args, dtype=weight.dtype)
    return (q.reshape(shape), scale.reshape(*shape[:-1], -1), deq.reshape(shape))


def group_scales(weight: torch.Tensor, bits: int, scheme: WeightScheme) -> torch.Tensor:
    """The scales :func:`quantize_matrix` uses for ``weight`` ([..., out, in] -> [..., out, in / group], the weight's
    dtype), without quantizing (what the export's compressor takes beside the weight)."""
    return _group_qparams(weight, bits, scheme)[0].reshape(*weight.shape[:-1], -1)


def _group_qparams(weight: torch.Tensor, bits: int, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' symmetric scales and zero points of each group of ``scheme.group_size`` inputs:
    ([rows, groups] in the weight's dtype, [rows, groups])."""
    from compressed_tensors.quantization.utils import calculate_qparams

    shape, g = weight.shape, scheme.group_size
    if shape[-1] % g:
        raise AllocoptError(f"input width {shape[-1]} is not a multiple of the group size {g}; use a group size that "
                            "divides it (WeightScheme.for_model picks one)")
    groups = weight.detach().reshape(-1, shape[-1]).reshape(-1, shape[-1] // g, g)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.args(bits))
    return scale.to(weight.dtype), zero


# (model) -> {(layer, tensor name, bits): dequantized tensor}: each layer's levels are computed once per model
_LEVELS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def quantized_levels(model: nn.Module, block: MoEBlock, bits: int, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """Dequantized expert matrices of ``block`` at ``bits`` (name -> [E, out, in]), computed on first use and kept."""
    cache = _LEVELS.setdefault(model, {})
    out = {}
    for name, t in _expert_matrices(block):
        key = (block.layer, name, int(bits), scheme.group_size, t.data_ptr(), tuple(t.shape))   # a pruned layer: new key
        if key not in cache:
            if t.device.type == "meta":
                raise AllocoptError("--bits needs the experts' weights in memory; this model is offloaded (load it "
                                    "without --offload, or drop --bits)")
            cache[key] = quantize_matrix(t, bits, scheme)[2]
        out[name] = cache[key]
    return out


@contextlib.contextmanager
def quantize_experts(model: nn.Module, bits: Mapping[int, int], scheme: WeightScheme | None = None) -> Iterator[nn.Module]:
    """Inside the context the routed experts of each MoE layer in ``bits`` compute with their weights quantized to
    ``bits[layer]`` (``scheme``'s groups); other layers are untouched. On exit the model is exactly as before."""
    if not bits:
        yield model
        return
    scheme = scheme or WeightScheme.for_model(model)
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    unknown = sorted(set(bits) - set(blocks))
    if unknown:
        raise AllocoptError(f"layers {unknown} are not MoE layers of this model; quantize only its MoE layers "
                            f"({sorted(blocks)})")
    check_bits(list(bits.values()))
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for layer, b in bits.items():
            block = blocks[layer]
            for name, tensor in quantized_levels(model, block, b, scheme).items():
                owner_path, _, attr = name.rpartition(".")
                owner = block.experts.get_submodule(owner_path) if owner_path else block.experts
                param = owner._parameters[attr]
                saved.append((param, "data", param.data))
                param.data = tensor
        yield model
    finally:
        for param, _, data in reversed(saved):
            param.data = data


def plan_scheme(model: nn.Module, plan) -> WeightScheme:
    """The scheme a plan with bits was scored with: the group size its plan.json records (``quantization``), else
    :meth:`WeightScheme.for_model`'s."""
    recorded = (getattr(plan, "extra", {}).get("quantization") or {}).get("group_size")
    return WeightScheme(int(recorded)) if recorded else WeightScheme.for_model(model)


@contextlib.contextmanager
def apply_plan(model: nn.Module, plan) -> Iterator[nn.Module]:
    """``model`` as ``plan`` (an ``allocopt.plan.Plan``) was scored: its pruned experts masked
    (``models.masking.mask_experts``) and its quantized layers' experts at their bit-widths."""
    from allocopt.models.masking import mask_experts

    bits = plan.bits
    with mask_experts(model, plan.kept), quantize_experts(model, bits, plan_scheme(model, plan) if bits else None):
        yield model


def clear_levels(model: nn.Module) -> None:
    """Drop ``model``'s cached quantized levels (e.g. after its weights changed)."""
    _LEVELS.pop(model, None)




def packs_experts(quantization_config: Mapping | None) -> bool:
    """Whether a checkpoint's ``quantization_config`` is compressed-tensors pack-quantized routed experts (what
    ``allocopt prune`` writes for a plan with bits)."""
    qc = dict(quantization_config or {})
    targets = [t for g in (qc.get("config_groups") or {}).values() for t in (g or {}).get("targets", [])]
    return (qc.get("quant_method") == "compressed-tensors" and qc.get("format") == "pack-quantized"
            and bool(targets) and all("experts" in t for t in targets))


def dequantized_state(directory, quantization_config):
    """Every tensor of the checkpoint in ``directory`` under its stored name, the packed expert matrices
    (``<module>.weight_packed``/``weight_scale``/``weight_shape``) decompressed to ``<module>.weight`` with the scheme of
    the config group whose target matches the module: what ESAP scored. stock transformers (5.25) decompresses
    fused experts with one scheme per model and expects every layer's experts packed, so a plan with several
    bit-widths, or with some layers at full precision, loads through here (``models.pruned.load_pruned``), and
    through a copy of this function in an export's own modelling code (``export.remote_code``), so it imports
    nothing from allocopt. ValueError for a packed module that no config group targets."""
    import re
    from pathlib import Path

    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    config = QuantizationConfig.model_validate(dict(quantization_config))
    schemes = [(re.compile(t[3:]) if t.startswith("re:") else None, t, s)
               for s in config.config_groups.values() for t in s.targets]
    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(file)))
    for name in [n for n in state if n.endswith(".weight_packed")]:
        module = name[: -len(".weight_packed")]
        scheme = next((s for rx, t, s in schemes if (rx.match(module) if rx else module.endswith(t))), None)
        if scheme is None:
            raise ValueError(f"{module} is packed but no quantization_config group targets it")
        parts = {k: state.pop(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        state[f"{module}.weight"] = weight.to(parts["weight_scale"].dtype)
    return state


__all__ = ["SUPPORTED_BITS", "WeightScheme", "apply_plan", "check_bits", "clear_levels", "plan_scheme", "dequantized_state", "packs_experts",
           "group_scales", "quantize_experts", "quantize_matrix", "quantized_levels"]
