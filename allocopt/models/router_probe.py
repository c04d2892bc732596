"""Checking a router rule against the real router: run the model once with every MoE block's router and experts
call recorded, then replay the recorded logits through the rule's reference implementation (``routing.route``).

:func:`verify` checks each block's family rule (the tests run it on every type of the installed transformers);
:func:`infer` finds, for a model type the family table does not know, the simplest candidate rule that reproduces the
router. Both take the blocks discovery found (``adapter.find_moe_blocks``), so discovery can call :func:`infer`
without this module calling discovery back.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from allocopt.models.calls import experts_call, restore
from allocopt.models.hooks import input_device, shadow_forward
from allocopt.models.routing import RouterRule, RoutingParams, RuleMismatch, config_value, route


class _FirstLinear(TorchFunctionMode):
    """Records the first ``F.linear`` output of width ``rows`` (the router's logits)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.logits = rows, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.logits is None and func is F.linear and out.shape[-1] == self.rows:
            self.logits = out.detach().reshape(-1, self.rows)
        return out


@dataclass
class Observed:
    """What one MoE layer's router produced and what its experts received, for one forward."""

    logits: list[torch.Tensor] = field(default_factory=list)
    index: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def observe_routing(blocks: Sequence[Any]) -> Iterator[dict[int, Observed]]:
    """Inside the context every MoE block of ``blocks`` (``adapter.MoEBlock``) records its router logits and the
    (indices, weights) its experts get."""
    seen: dict[int, Observed] = {}
    saved: list = []
    try:
        for b in blocks:
            rec = seen.setdefault(b.layer, Observed())

            def router_forward(own, _rec=rec, _rows=b.router_rows):
                def run(*a, **k):
                    with _FirstLinear(_rows) as mode:
                        out = own(*a, **k)
                    if mode.logits is not None:
                        _rec.logits.append(mode.logits.float())
                    return out
                return run

            def on_route(hidden, idx, w, expert_fn, _rec=rec):
                _rec.index.append(idx.detach())
                _rec.weights.append(w.detach().float())
                return None

            saved.append(shadow_forward(b.router, router_forward))
            saved.extend(experts_call(b).intercept(b, on_route))
        yield seen
    finally:
        restore(saved)


def _canonical(idx: torch.Tensor, w: torch.Tensor, num_experts: int, skip_column: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots sorted by expert id; a skip column's slots (id E) become (0, 0) as the experts see them."""
    if skip_column:
        skip = idx >= num_experts
        idx, w = idx.masked_fill(skip, 0), w.masked_fill(skip, 0.0)
    order = idx.argsort(dim=-1, stable=True)
    return idx.gather(1, order), w.gather(1, order)


def matches(rule: RouterRule, params: RoutingParams, block: Any, observed: Observed,
            input_ids: torch.Tensor | None = None, rtol: float = 2e-3) -> bool:
    """Does ``rule`` reproduce, from the recorded logits, every (indices, weights) the experts were called with?"""
    if not observed.logits or len(observed.logits) != len(observed.index):
        return False
    for logits, idx, w in zip(observed.logits, observed.index, observed.weights):
        try:
            ref_idx, ref_w = route(rule, params, logits, block.info.num_experts, bias=block.choice_bias(),
                                   input_ids=input_ids, hash_table=block.hash_table(),
                                   per_expert_scale=block.per_expert_scale(params))
        except RuleMismatch:
            return False
        skip = block.family.router_tail == "skip"
        a_idx, a_w = _canonical(idx.long().reshape(ref_idx.shape[0], -1), w.reshape(ref_idx.shape[0], -1), block.info.num_experts, skip)
        b_idx, b_w = _canonical(ref_idx, ref_w, block.info.num_experts, skip)
        if a_idx.shape != b_idx.shape or not torch.equal(a_idx, b_idx):
            return False
        if not torch.allclose(a_w, b_w, rtol=rtol, atol=1e-5):
            return False
    return True


def probe(model: nn.Module, blocks: Sequence[Any], tokens: int = 24, seed: int = 0
          ) -> tuple[dict[int, Observed], torch.Tensor]:
    """One forward of ``tokens`` random token ids with the routing of ``blocks`` recorded; returns (records per
    layer, input ids)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(3, max(4, vocab), (1, tokens), generator=torch.Generator().manual_seed(seed))
    device = input_device(model)
    with torch.no_grad(), observe_routing(blocks) as seen:
        model(input_ids=ids.to(device), use_cache=False)
    return seen, ids.reshape(-1)


def verify(model: nn.Module, blocks: Sequence[Any]) -> dict[int, bool]:
    """Per MoE layer: does the family's rule reproduce what the real router did on random tokens? ``blocks`` are
    ``find_moe_blocks(model)``."""
    seen, ids = probe(model, blocks)
    return {b.layer: matches(b.family.rule, b.params, b, seen[b.layer], ids) for b in blocks}


# Candidate rules for a model type the table does not know, simplest first.
def _candidates(has_bias: bool, has_groups: bool) -> list[RouterRule]:
    out = []
    for score, weights, bias_on, group, renorm in itertools.product(
            ("softmax", "sigmoid", "logits", "sqrt-softplus"), ("scores", "softmax-topk", "sigmoid-topk"),
            (None, "scores", "logits") if has_bias else (None,), (None, "top2-sum", "max") if has_groups else (None,),
            (False, True)):
        if score == "logits" and weights == "scores":
            continue
        for fill in ((-math.inf, 0.0) if group else (-math.inf,)):
            out.append(RouterRule(score=score, weights=weights, bias_on=bias_on, group=group, group_fill=fill,
                                  renorm=renorm, eps=1e-20 if renorm else 0.0, scale="routed_scaling_factor"))
    return out


def infer(model: nn.Module, blocks: Sequence[Any]) -> dict[int, RouterRule | None]:
    """Per MoE layer of ``blocks`` (discovery's, with a generic family), the simplest candidate rule that reproduces
    the real router; None where none does."""
    seen, ids = probe(model, blocks)
    out: dict[int, RouterRule | None] = {}
    for b in blocks:
        found = None
        groups = b.family.group_fields or ("n_group", "topk_group")
        for rule in _candidates(b.choice_bias() is not None, config_value(b.config, groups[0]) not in (None, 1)):
            params = RoutingParams.resolve(rule, b.config, b.info.top_k, groups)
            if matches(rule, params, b, seen[b.layer], ids):
                found = rule
                break
        out[b.layer] = found
    return out


__all__ = ["Observed", "infer", "matches", "observe_routing", "probe", "verify"]
