"""How a family's MoE block hands tokens to its experts, and how to listen in without changing the output.

Almost every family calls ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`` (transformers'
``@use_experts_implementation`` classes); two do not: Llama-4 scales each expert's *input* by its router score
and runs every expert densely on ``[E*T, H]``, and JetMoE sorts tokens by expert and calls two parallel-expert
linears. Each convention here gives the same view of a block call: the hidden rows the experts see, the chosen
expert ids and gate weights, and ``expert_fn(hidden [N, H], ids [N]) -> [N, H]``, each row's unweighted expert
output (``f_e(x)``, spec transformers-moe A.5). The observer and the routing probe are written against that view.

``intercept(block, on_route)`` installs wrappers (``allocopt.models.hooks.shadow_forward``, inside any accelerate
hook) and returns the functions that undo them. ``on_route(hidden, idx, w, expert_fn)`` may return the block's expert output (the standard
convention then uses it instead of calling the experts again); None means "run the experts as usual".
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from allocopt.models.hooks import shadow_forward

OnRoute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                   "torch.Tensor | None"]
Restore = list[Callable[[], None]]


class ExpertsCall(Protocol):
    def intercept(self, block: Any, on_route: OnRoute) -> Restore: ...


def _shadow(module: nn.Module, forward: Callable[..., Any], restore: Restore) -> Callable[..., Any]:
    """Make ``module`` run ``forward``; returns what it ran before (for ``forward`` to call)."""
    before: list[Callable[..., Any]] = []
    restore.append(shadow_forward(module, lambda own: (before.append(own), forward)[1]))
    return before[0]


class StandardCall:
    """``experts(hidden, top_k_index, top_k_weights)``; hidden may be [B, S, H] (DBRX), indices are per row."""

    def intercept(self, block: Any, on_route: OnRoute) -> Restore:
        restore: Restore = []
        holder: dict[str, Callable[..., Any]] = {}

        zero_expert = block.info.num_experts if block.family.router_tail == "zero" else None

        def expert_fn(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            ids = ids.reshape(-1, 1)
            ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            if zero_expert is not None:           # LongCat's eager loop needs two slots: pad with a zero expert, weight 0
                ids = torch.cat([ids, torch.full_like(ids, zero_expert)], dim=1)
                ones = torch.cat([ones, torch.zeros_like(ones)], dim=1)
            return holder["own"](x, ids, ones)

        def forward(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
            flat = hidden.reshape(-1, hidden.shape[-1])
            out = on_route(flat, idx.reshape(flat.shape[0], -1), w.reshape(flat.shape[0], -1), expert_fn)
            if out is None:
                return holder["own"](hidden, idx, w, *rest, **kw)
            return out.reshape(hidden.shape).to(hidden.dtype)

        holder["own"] = _shadow(block.experts, forward, restore)
        return restore


class InputScaledCall:
    """Llama-4: ``router(x) -> (scores [T, E] dense, logits)``, then ``experts(x.repeat(E) * scores)``."""

    def intercept(self, block: Any, on_route: OnRoute) -> Restore:
        restore: Restore = []
        holder: dict[str, Any] = {}
        top_k = block.info.top_k

        def router_forward(x: torch.Tensor, *a: Any, **k: Any) -> Any:
            scores, logits = holder["router"](x, *a, **k)
            holder["seen"] = (x.reshape(-1, x.shape[-1]), scores)
            return scores, logits

        def expert_fn(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            n_experts = int(block.experts.gate_up_proj.shape[0])
            routed = torch.zeros(n_experts, x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
            rows = torch.arange(x.shape[0], device=x.device)
            routed[ids.reshape(-1), rows] = x
            out = holder["experts"](routed.reshape(-1, x.shape[1])).view(n_experts, x.shape[0], -1)
            return out[ids.reshape(-1), rows]

        def experts_forward(routed_in: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            x, scores = holder.pop("seen")
            w, idx = scores.float().topk(top_k, dim=-1)
            on_route(x, idx, w, expert_fn)
            return holder["experts"](routed_in, *a, **k)

        holder["router"] = _shadow(block.router, router_forward, restore)
        holder["experts"] = _shadow(block.experts, experts_forward, restore)
        return restore


class ParallelCall:
    """JetMoE: the router sorts (token, slot) pairs by expert; ``input_linear``/``output_linear`` run per expert."""

    def intercept(self, block: Any, on_route: OnRoute) -> Restore:
        restore: Restore = []
        holder: dict[str, Any] = {}
        top_k = block.info.top_k

        def router_forward(x: torch.Tensor, *a: Any, **k: Any) -> Any:
            out = holder["router"](x, *a, **k)
            sorted_slots, _, gates, _, _ = out
            t = x.shape[0]
            idx = torch.empty(t * top_k, dtype=torch.long, device=x.device)
            w = torch.empty(t * top_k, dtype=gates.dtype, device=x.device)
            experts_sorted = torch.repeat_interleave(torch.arange(len(out[3]), device=x.device),
                                                     torch.tensor(out[3], device=x.device))
            idx[sorted_slots] = experts_sorted
            w[sorted_slots] = gates
            on_route(x, idx.view(t, top_k), w.view(t, top_k), expert_fn)
            return out

        def expert_fn(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            ids = ids.reshape(-1)
            order = ids.argsort(stable=True)
            moe = block.block
            sizes = torch.bincount(ids, minlength=int(moe.input_linear.weight.shape[0])).tolist()
            h = moe.input_linear(x[order], sizes)
            gate, up = h.chunk(2, dim=-1)
            out_sorted = moe.output_linear(moe.activation(gate) * up, sizes)
            out = torch.empty_like(out_sorted)
            out[order] = out_sorted
            return out

        holder["router"] = _shadow(block.router, router_forward, restore)
        return restore


CALLS: dict[str, ExpertsCall] = {"standard": StandardCall(), "input-scaled": InputScaledCall(), "parallel": ParallelCall()}


def experts_call(block: Any) -> ExpertsCall:
    return CALLS[block.family.experts_call]


def restore(saved: Restore) -> None:
    for undo in reversed(saved):
        undo()
