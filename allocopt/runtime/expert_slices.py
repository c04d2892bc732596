"""Run an offloaded layer's experts a few at a time, so a layer-streamed pass never holds all of them.

A decoder layer of a large MoE is almost all experts (OLMoE-1B-7B: 805 of 838 MB; DeepSeek-V3: 22.5 of 22.9 GB).
Streaming whole layers therefore costs one layer of memory; streaming expert slices costs one slice. For a block
whose experts module accelerate offloaded to safetensors files (``runtime.offload.DirectReads``), :func:`sliced_experts`
turns that module's accelerate loading off and makes its forward read experts ``e .. e + k`` of every fused tensor
(the rows of a ``[E, ...]`` tensor are contiguous on disk), run the rows routed to them, and drop them. The result is
the experts module's own forward on the same rows, so values are unchanged; each call re-reads the slices it needs.

Used by the observer's layer-major pass (``calibration.observer``), where each batch makes one routed call per layer.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn

from allocopt.models.families import COUNT_ATTRS
from allocopt.models.hooks import shadow_forward
from allocopt.runtime.offload import DirectReads


def _direct_map(module: nn.Module) -> tuple[DirectReads, str] | None:
    from accelerate.utils.offload import PrefixedDataset

    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if not getattr(hook, "offload", False) or not isinstance(weights, PrefixedDataset) \
            or not isinstance(weights.dataset, DirectReads):
        return None
    return weights.dataset, weights.prefix


def sliceable(block: Any) -> bool:
    """The block calls its experts the standard way and every expert tensor is offloaded to a safetensors file."""
    experts = block.experts
    found = _direct_map(experts)
    if found is None or block.family.experts_call != "standard" or block.family.router_tail is not None:
        return False
    direct, prefix = found
    names = [n for n, _ in experts.named_parameters(recurse=False)]
    if not names or any(True for _ in experts.named_buffers()) or \
            any(True for child in experts.children() for _ in child.parameters()):
        return False
    index = direct.loader.index
    return all((index.get(prefix + n) or {}).get("safetensors_file") for n in names)


@contextlib.contextmanager
def sliced_experts(block: Any, per_read: int) -> Iterator[None]:
    """Inside the context ``block.experts`` runs ``per_read`` experts at a time, read straight from disk."""
    experts = block.experts
    direct, prefix = _direct_map(experts)
    n = block.info.num_experts
    names = [name for name, _ in experts.named_parameters(recurse=False)]
    placeholders = {name: experts._parameters[name] for name in names}
    counts = {a: getattr(experts, a) for a in COUNT_ATTRS if getattr(experts, a, None) == n}
    hook = experts._hf_hook
    device = hook.execution_device if hook.execution_device is not None else "cpu"

    per_expert = {name for name in names if direct.first_dim(prefix + name) == n}   # [E, ...] tensors: sliced

    def load(e0: int, e1: int) -> None:
        for name in names:
            t = direct.rows(prefix + name, e0, e1) if name in per_expert else direct[prefix + name]
            experts._parameters[name] = nn.Parameter(t.to(device), requires_grad=False)
        for attr in counts:
            setattr(experts, attr, e1 - e0)

    def unload() -> None:
        experts._parameters.update(placeholders)
        for attr, value in counts.items():
            setattr(experts, attr, value)

    def make(own):
        def forward(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
            out = torch.zeros_like(hidden)
            flat_idx = idx.reshape(hidden.shape[0], -1)
            flat_w = w.reshape(hidden.shape[0], -1)
            for e0 in range(0, n, per_read):
                e1 = min(n, e0 + per_read)
                inside = (flat_idx >= e0) & (flat_idx < e1)
                rows = inside.any(-1).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                load(e0, e1)
                try:
                    sub_idx = torch.where(inside[rows], flat_idx[rows] - e0, 0)
                    sub_w = torch.where(inside[rows], flat_w[rows], torch.zeros_like(flat_w[rows]))
                    out[rows] += own(hidden[rows], sub_idx, sub_w, *rest, **kw).to(out.dtype)
                finally:
                    unload()
            return out
        return forward

    hook.offload = False                          # accelerate must not load the whole tensors on each call
    undo = shadow_forward(experts, make)
    try:
        yield
    finally:
        undo()
        hook.offload = True


def slice_size(block: Any, budget_bytes: int) -> int:
    """Experts per read so that one slice of ``block`` takes at most ``budget_bytes`` (at least 1)."""
    per_expert = max(1, block.info.bytes_per_expert)
    return max(1, min(block.info.num_experts, math.floor(budget_bytes / per_expert)))


__all__ = ["slice_size", "sliceable", "sliced_experts"]
