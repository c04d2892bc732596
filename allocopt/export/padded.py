"""The exact padded export: every MoE layer padded to the widest kept count with experts that can never be chosen.

A padded checkpoint has one expert count for every layer, so stock transformers and stock vLLM load it with no plugin
and no remote code. It equals the pruned model only where the router has a per-expert additive term that, at -inf,
removes an expert from the choice without changing the other experts' weights (spec serving.md section 3):

* a bias on the router logits (GPT-OSS ``router.bias``): a -inf logit is exactly allocopt's mask;
* a selection-only bias (``Family.selection_bias_paths``) added to the logits, or to scores that are computed per
  expert (sigmoid: DeepSeek-V3, GLM4-MoE): the chosen experts' weights never read it.

It cannot be exact where a padded expert still enters a softmax over all experts (no bias: OLMoE, Qwen, Mixtral; or
a bias added after the softmax: ERNIE-4.5), where a soft cap turns -inf into a finite logit, or where experts of
groups not chosen are refilled with a finite score. :func:`pad_problem` names the reason and ``pad_model`` refuses.

Group-limited routing (DeepSeek-V3 ``n_group``) keeps its groups: each group is padded in place with the same number
of padded experts, so groups stay equal, and a padded expert (score -inf) never enters a group's top-2 sum because
every group keeps at least what its group score reads (``MoELayerInfo.min_kept``).

Padded experts reuse pruned expert slots: their weights are zeroed, their router rows zeroed and their bias set to
-inf. Memory: ``L_moe * max_l(n_l)`` experts instead of ``sum_l n_l`` (:func:`padded_expert_bytes`).

Example::

    pad_model(model, plan.kept)           # in place; then model.save_pretrained(dir) is a stock checkpoint
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.models.adapter import MoEBlock, expert_tensors, find_moe_blocks, invalidate
from allocopt.models.masking import selection_bias_owners
from allocopt.models.routing import SCORES
from allocopt.plan import check_kept

# Score functions computed per expert (a padded expert's score does not change another expert's).
ELEMENTWISE_SCORES = frozenset(SCORES) - {"softmax"}


def _logit_bias(block: MoEBlock) -> tuple[nn.Module, str] | None:
    """The router's bias on the logits: the ``bias`` beside the router weight (``F.linear(x, weight, bias)``)."""
    weight = block.router_weight
    for module in block.router.modules():
        if module._parameters.get("weight") is weight:
            bias = module._parameters.get("bias")
            if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == block.router_rows:
                return module, "bias"
    return None


def _selection_bias(block: MoEBlock) -> tuple[nn.Module, str] | None:
    """The block's first selection-only bias (router or block level), as masking finds it."""
    owners = selection_bias_owners(block)
    return owners[0] if owners else None


def pad_problem(block: MoEBlock) -> str | None:
    """Why padding this layer cannot be exact (None when it can), as a clause naming the router's rule."""
    rule, params = block.family.rule, block.params
    name = f"{block.family.model_type} ({block.info.router_rule})"
    if rule.select != "topk" or block.hash_routed:
        return f"{name} does not choose experts by top-k, so a padded expert has no score to push out of the choice"
    if params.n_group > 1 and math.isfinite(rule.group_fill):
        return (f"{name} refills the experts of groups it does not choose with {rule.group_fill:g}, "
                "so a padded expert there could still be chosen")
    if _logit_bias(block) is not None and not rule.softcap:
        return None
    if _selection_bias(block) is not None:
        if rule.bias_on == "logits" or params.score in ELEMENTWISE_SCORES:
            return None
        return (f"{name} adds its selection bias after a softmax over all experts, where a padded expert's probability "
                "still changes the other experts' scores")
    if _logit_bias(block) is not None:
        return f"{name} soft-caps its router logits, which turns a -inf logit bias into a finite logit"
    return (f"{name} has no per-expert router bias, so a padded expert cannot be made unselectable and still takes "
            "part in the router's softmax")


def pad_slots(block: MoEBlock, keep: Sequence[int], width: int) -> list[int]:
    """``width - len(keep)`` pruned expert ids that become padded experts; with group-limited routing an equal number
    in each group, so the padded layer keeps the group partition of the original one."""
    n, groups = block.info.num_experts, max(block.info.groups, 1)
    kept, extra = set(int(e) for e in keep), width - len(keep)
    if extra % groups:
        raise AllocoptError(f"layer {block.layer}: padding {len(keep)} to {width} experts does not split evenly into "
                            f"{groups} routing groups; use a plan whose counts are multiples of {groups}")
    size = n // groups
    slots: list[int] = []
    for g in range(groups):
        free = [e for e in range(g * size, (g + 1) * size) if e not in kept]
        slots += free[: extra // groups]
    return slots


# Set on a model that pad_model changed: an export must not pad it again, and an unpruned model of the same shapes
# (every layer at the widest count, which a plan that keeps some layer whole has) is not padded.
PADDED_ATTR = "_allocopt_padded"


def pad_model(model: nn.Module, kept: Mapping[int, Sequence[int]], check_exact: bool = True) -> dict[int, int]:
    """Prune ``model`` in place to ``kept`` padded to one width per layer; returns ``{layer: kept count}``.

    Raises AllocoptError naming the reason when the family's router cannot make padding exact. ``check_exact=False``
    builds the same shapes for any family (benchmarks measure what padding would cost there); its outputs then differ
    from the pruned model's.
    """
    from allocopt.models.pruned import LAYER_COUNTS_FIELD
    from allocopt.models.surgery import prune_model

    blocks = {b.layer: b for b in find_moe_blocks(model)}
    kept = check_kept([b.info for b in blocks.values()], kept, "the plan", type(model).__name__)
    kept = {l: kept.get(l, list(range(b.info.num_experts))) for l, b in blocks.items()}   # unlisted layers keep all
    counts = {l: len(k) for l, k in kept.items()}
    width = max(counts.values())
    if check_exact:
        for b in blocks.values():
            problem = pad_problem(b)
            if problem and counts[b.layer] < width:
                raise AllocoptError(f"--pad cannot be exact here: {problem}; export without --pad "
                                    "(the compact export loads with the allocopt vLLM plugin or its own modelling code)")
    slots = {l: pad_slots(b, kept[l], width) for l, b in blocks.items()}
    prune_model(model, {l: sorted({*kept[l], *slots[l]}) for l in blocks})
    new_blocks = {b.layer: b for b in find_moe_blocks(model)}
    with torch.no_grad():
        for layer, pads in slots.items():
            if pads:
                order = sorted({*kept[layer], *pads})
                _silence(new_blocks[layer], [order.index(p) for p in pads])
    for target in {id(model.config): model.config, id(_text(model)): _text(model)}.values():
        if hasattr(target, LAYER_COUNTS_FIELD):          # every layer has one width now: a stock config
            delattr(target, LAYER_COUNTS_FIELD)
    invalidate(model)
    setattr(model, PADDED_ATTR, True)
    return counts


def _text(model: nn.Module):
    from allocopt.models.adapter import text_config

    return text_config(model)


def _silence(block: MoEBlock, rows: list[int]) -> None:
    """Zero the experts at ``rows`` (weights, biases, router rows) and set their padding bias to -inf."""
    n, tail = block.info.num_experts, block.tail
    idx = torch.tensor(rows, dtype=torch.long)
    router_ids = {id(t) for t in list(block.router.parameters()) + list(block.router.buffers())}
    for _, t, stacked in expert_tensors(block.experts, n, tail, block.family.expert_layout, router_ids):
        view = t.data if stacked == t.shape[0] else t.data.view(stacked, -1, *t.shape[1:])
        view.index_fill_(0, idx.to(t.device), 0)
    block.router_weight.data.index_fill_(0, idx.to(block.router_weight.device), 0)
    found = _logit_bias(block) or _selection_bias(block)        # None only for a family padded with check_exact=False
    if found is not None:
        bias = getattr(*found)
        bias.data.index_fill_(bias.dim() - 1, idx.to(bias.device), float("-inf"))


def padded_expert_bytes(model: nn.Module, kept: Mapping[int, Sequence[int]]) -> tuple[int, int]:
    """``(compact, padded)`` bytes of routed-expert weights for ``kept`` on the unpruned ``model``."""
    blocks = find_moe_blocks(model)
    counts = {b.layer: len(kept.get(b.layer, range(b.info.num_experts))) for b in blocks}
    width = max(counts.values())
    per = {b.layer: b.info.bytes_per_expert for b in blocks}
    return sum(counts[l] * per[l] for l in counts), sum(width * per[l] for l in counts)


__all__ = ["pad_model", "pad_problem", "pad_slots", "padded_expert_bytes"]
