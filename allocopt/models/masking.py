"""Run-time expert masking that is exactly equivalent to structural removal (spec transformers-moe A.3).

A pruned expert must be unselectable and the survivors must renormalise as if it were gone, so -inf is
added to the router's logits *before* the family's own softmax/sigmoid/top-k. We cannot hook the
router's output (top-k has already run), so the router's own forward runs inside a ``TorchFunctionMode``
that adds the mask to the first ``F.linear`` result of router width. Selection-only biases (DeepSeek
``e_score_correction_bias``, ERNIE ``moe_statics``) are replaced by copies that are -inf at the pruned ids
while the block runs, or a large bias could still pick an expert whose probability is 0. Rows after the routed
experts (zero/identity experts, a skip class, shared-expert rows) are never masked. Nothing is copied but the
few bias entries that change, and nothing is changed outside a block's own forward, so masking also works on a
model accelerate dispatched or offloaded (``allocopt.models.hooks``).

Example::

    with mask_experts(model, {1: [0, 2, 5], 2: [1, 3]}):
        logits = model(ids).logits
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from allocopt.models.adapter import MoEBlock, find_moe_blocks
from allocopt.models.hooks import shadow_forward
from allocopt.plan import check_kept


class _RouterLogitMask(TorchFunctionMode):
    """Adds ``add`` ([R], 0 or -inf) to the first ``F.linear`` output of width R, then gets out of the way."""

    def __init__(self, add: torch.Tensor):
        super().__init__()
        self.add, self.done = add, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.done and func is F.linear and out.shape[-1] == self.add.shape[-1]:
            self.done = True
            out = out + self.add.to(out.device, out.dtype)
        return out


def _masked_forward(forward: Callable[..., Any], add: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    with _RouterLogitMask(add):
        return forward(*args, **kwargs)


@contextlib.contextmanager
def mask_experts(model: nn.Module, kept: Mapping[int, Sequence[int]]) -> Iterator[nn.Module]:
    """Inside the context only ``kept[layer]`` experts are routable in each listed MoE layer; layers not in
    ``kept`` are untouched. On exit the model is exactly as before (outputs ``torch.equal``). Works on a model that
    accelerate dispatched or offloaded: every change is made while the block runs, on its materialised weights."""
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    kept = check_kept([b.info for b in blocks.values()], kept, "the plan", type(model).__name__)
    plan = [(blocks[l], ids) for l, ids in ((l, sorted(set(range(blocks[l].info.num_experts)) - set(k)))
                                            for l, k in kept.items()) if ids]
    undo: list[Callable[[], None]] = []
    try:
        for block, ids in plan:
            undo.append(_mask_router(block, ids))
            biases = selection_bias_owners(block)
            if biases:
                undo.append(shadow_forward(block.block, lambda own, _b=biases, _ids=ids: _with_masked_biases(own, _b, _ids)))
        yield model
    finally:
        for fn in reversed(undo):
            fn()


def _mask_router(block: MoEBlock, ids: list[int]) -> Callable[[], None]:
    add = torch.zeros(block.router_rows, dtype=torch.float32)          # tail rows stay routable
    add[ids] = float("-inf")
    return shadow_forward(block.router, lambda own: lambda *a, **k: _masked_forward(own, add, *a, **k))


def selection_bias_owners(block: MoEBlock) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of each selection-only bias of the block (router or block level)."""
    out = []
    for path in block.family.selection_bias_paths:
        owner_path, _, name = path.rpartition(".")
        try:
            owner = block.block.get_submodule(owner_path) if owner_path else block.block
        except AttributeError:
            continue
        if isinstance(getattr(owner, name, None), torch.Tensor):
            out.append((owner, name))
    return out


def _with_masked_biases(forward: Callable[..., Any], biases: list[tuple[nn.Module, str]], ids: list[int]) -> Callable[..., Any]:
    """``forward`` run with each selection bias replaced by a copy that is -inf at the pruned ids."""
    def run(*args: Any, **kwargs: Any) -> Any:
        saved = []
        try:
            for owner, name in biases:
                original = getattr(owner, name)
                masked = original.detach().clone()
                masked[..., ids] = float("-inf")
                store = owner._parameters if name in owner._parameters else owner._buffers
                saved.append((store, name, original))
                store[name] = nn.Parameter(masked, requires_grad=False) if store is owner._parameters else masked
            return forward(*args, **kwargs)
        finally:
            for store, name, original in reversed(saved):
                store[name] = original
    return run
