"""Router rules as data, a reference implementation of each, and a probe that checks a rule against the real router.

A rule says how a router turns its logits ``[T, R]`` into what the experts receive, ``(top_k_index [T, K],
top_k_weights [T, K])``. It is composed of a few steps that cover every router in transformers 5.x:

    logits -> [softcap] -> score (softmax | sigmoid | sqrt-softplus | logits) -> [+ selection bias]
           -> [group-limited: keep the best topk_group of n_group groups] -> top-k (or sparsemixer | hash table)
           -> weights (the chosen scores | softmax or sigmoid of the chosen logits | joint with shared experts)
           -> [renorm | p-norm | clamped renorm] -> [x scale]

``route(rule, params, logits, ...)`` runs those steps; ``router_probe.verify`` runs the real model once with hooks on
each MoE block and checks that the rule, run on the logits the router produced, reproduces the indices and weights
the experts were called with. The family table (``families.py``) is checked this way in the tests, and a model
type missing from the table gets its rule inferred the same way (``router_probe.infer``), never guessed.

Group-limited routing (DeepSeek-V3 ``n_group``/``topk_group``) is also where pruning constraints come from:
a group is scored by the sum of its best two experts (``top2-sum``) or by its best one (``max``), so every group
must keep the same number of experts (structural removal re-partitions groups otherwise) and at least what its
group score reads, and the kept groups must hold at least top-k experts (:func:`group_floor`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrt-softplus": lambda x: torch.sqrt(F.softplus(x)),
    "logits": lambda x: x,
}
# How a group is scored in group-limited routing, and how many kept experts per group that reads.
GROUP_SCORES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "top2-sum": (lambda g: g.topk(2, dim=-1)[0].sum(-1), 2),
    "max": (lambda g: g.max(dim=-1).values, 1),
}
# Config spellings of score functions (cohere2 expert_selection_fn, deepseek_v4 / inkling2 scoring_func).
SCORE_ALIASES = {"sqrtsoftplus": "sqrt-softplus", "softplus_sqrt": "sqrt-softplus"}


@dataclass(frozen=True)
class RouterRule:
    """How logits become (indices, weights). Field values that name config fields are read per model.

    ``score`` may be ``"config:FIELD"`` (the config chooses the score function); ``renorm`` is True, False, a
    config flag, ``"pnorm:FIELD"`` (DBRX: divide by the p-norm, p from the config) or ``"clamp:FIELD"``
    (ERNIE: divide by max(sum, config value)); ``scale`` and ``output_scale`` are config fields, ``scale`` may
    be ``"param:NAME"`` for a per-expert learned multiplier on the router (Gemma-4 ``per_expert_scale``).
    """

    score: str = "softmax"
    softcap: str | None = None                 # config field: tanh soft-capping of the logits (Laguna)
    bias_on: str | None = None                 # "scores" | "logits": a selection-only bias added before choosing
    group: str | None = None                   # "top2-sum" | "max": group-limited top-k
    group_fill: float = -math.inf              # what the experts of groups not chosen are set to
    group_if: tuple[str, str] | None = None    # (config field, value): groups only under that setting
    select: str = "topk"                       # "topk" | "sparsemixer" (PhiMoE) | "hash" (token-id table)
    jitter: str | None = None                  # config field: sparsemixer's threshold (PhiMoE router_jitter_noise)
    weights: str = "scores"                    # "scores" | "softmax-topk" | "sigmoid-topk" | "joint-shared"
    renorm: bool | str = False
    eps: float = 0.0                           # added to the renorm denominator
    scale: str | None = None
    output_scale: str | None = None            # config field multiplying the routed output after the experts

    def name(self, p: "RoutingParams | None" = None) -> str:
        """A readable rule such as ``sigmoid+bias->group-topk->renorm*2.5`` (with ``p``, the model's values)."""
        score = p.score if p else self.score
        if self.select == "sparsemixer":
            return "sparsemixer"
        parts = []
        head = score if score != "logits" else ""
        if self.softcap:
            head = f"softcap->{head}" if head else "softcap"
        if self.bias_on:
            head = f"{head or 'logits'}+bias"
        if head:
            parts.append(head)
        grouped = self.group is not None and (p is None or p.n_group > 1)
        parts.append("hash" if self.select == "hash" else "group-topk" if grouped else "topk")
        weights = p.weights if p else self.weights
        if weights == "softmax-topk":
            parts.append("softmax")
        elif weights == "sigmoid-topk":
            parts.append("sigmoid")
        elif weights == "joint-shared":
            parts.append("joint-softmax(shared)")
        renorm = p.renorm if p else self.renorm
        if renorm:
            parts.append(renorm if isinstance(renorm, str) else "renorm")
        text = "->".join(parts)
        scale = p.scale_text if p else ("*scale" if self.scale or self.output_scale else "")
        return text + scale


@dataclass(frozen=True)
class RoutingParams:
    """A rule's config-dependent values for one model."""

    score: str
    top_k: int
    weights: str = "scores"
    n_group: int = 1
    topk_group: int = 1
    renorm: bool | str = False
    norm_value: float | None = None            # p of the p-norm, or the clamp minimum
    scale: float = 1.0
    output_scale: float = 1.0
    softcap: float = 0.0
    jitter: float = 0.0
    scale_params: tuple[str, ...] = ()         # router parameters multiplying the weights (per expert or scalar)
    scale_text: str = ""

    @classmethod
    def resolve(cls, rule: RouterRule, config: Any, top_k: int = 0, group_fields: tuple[str, str] | None = None
                ) -> "RoutingParams":
        score = rule.score
        if score.startswith("config:"):
            value = str(config_value(config, score.split(":", 1)[1]) or "")
            score = SCORE_ALIASES.get(value, value)
        renorm: bool | str = rule.renorm
        norm_value = None
        if isinstance(renorm, str):
            kind, _, fld = renorm.partition(":")
            if kind in ("pnorm", "clamp"):
                norm_value = config_value(config, fld)
                renorm = f"{kind}({norm_value:g})" if norm_value is not None and kind == "pnorm" else \
                    ("clamp-renorm" if norm_value is not None else False)
            else:
                renorm = bool(config_value(config, renorm))
        n_group = topk_group = 1
        if rule.group is not None and group_fields is not None and \
                (rule.group_if is None or str(config_value(config, rule.group_if[0])) == rule.group_if[1]):
            n_group = int(config_value(config, group_fields[0]) or 1)
            topk_group = int(config_value(config, group_fields[1]) or 1)
        weights = rule.weights
        if weights.startswith("config:"):
            weights = f"{config_value(config, weights.split(':', 1)[1])}-topk"
        scale, scale_params = 1.0, []
        for factor in (rule.scale.split("*") if rule.scale else ()):
            if factor.startswith("param:"):
                scale_params.append(factor.split(":", 1)[1])
            else:
                scale *= float(config_value(config, factor) or 1.0)
        output_scale = float(config_value(config, rule.output_scale) or 1.0) if rule.output_scale else 1.0
        total = scale * output_scale
        text = f"*{total:g}" if total != 1.0 else ""
        if scale_params:
            text += "*" + "*".join(scale_params).replace("_", "-")
        softcap = float(config_value(config, rule.softcap) or 0.0) if rule.softcap else 0.0
        jitter = float(config_value(config, rule.jitter) or 0.0) if rule.jitter else 0.0
        return cls(score, top_k, weights, n_group, topk_group, renorm, norm_value, scale, output_scale, softcap, jitter,
                   tuple(scale_params), text)


def config_value(config: Any, path: str | None) -> Any:
    """``config.a.b`` for a dotted ``path`` (DBRX keeps its counts in ``ffn_config``); None when absent."""
    if not path:
        return None
    obj = config
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def group_floor(rule: RouterRule, params: RoutingParams) -> tuple[int, int]:
    """``(groups, fewest kept per group)`` that group-limited routing needs to route exactly; ``(1, 0)`` without."""
    if params.n_group <= 1 or rule.group is None:
        return 1, 0
    reads = GROUP_SCORES[rule.group][1]
    return params.n_group, max(reads, -(-params.top_k // params.topk_group))


class RuleMismatch(ValueError):
    """A rule that cannot run on this router's output at all (a score function the config names but no rule knows,
    groups that do not divide the experts, more picks than columns, hash routing without its table): when
    probing candidates, a rule that does not match."""


def _check_applies(rule: RouterRule, p: RoutingParams, columns: int, has_hash_table: bool) -> None:
    if rule.select == "sparsemixer":
        return
    if p.score not in SCORES:
        raise RuleMismatch(f"score function {p.score!r} is none of {', '.join(SCORES)}")
    if p.n_group > 1 and columns % p.n_group:
        raise RuleMismatch(f"{columns} router columns do not form {p.n_group} equal groups")
    if p.n_group > 1 and p.topk_group > p.n_group:
        raise RuleMismatch(f"topk_group {p.topk_group} exceeds the {p.n_group} groups")
    if rule.select == "hash" and not has_hash_table:
        raise RuleMismatch("hash routing needs the layer's token-id table and the input ids")
    if not 0 < p.top_k <= columns:
        raise RuleMismatch(f"top-k {p.top_k} does not fit {columns} router columns")


# ---- the reference implementation -------------------------------------------------------------------------------

def route(rule: RouterRule, p: RoutingParams, logits: torch.Tensor, num_experts: int,
          bias: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
          hash_table: torch.Tensor | None = None, per_expert_scale: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [T, K] and weights [T, K] the rule gives for ``logits`` [T, R] (R >= num_experts; extra columns
    are a router's tail: zero/skip experts compete, shared-expert rows only join ``joint-shared`` weights)."""
    x = logits.float()
    if p.softcap > 0:
        x = torch.tanh(x / p.softcap) * p.softcap
    shared = x[:, num_experts:] if p.weights == "joint-shared" else None
    if shared is not None:
        x = x[:, :num_experts]
    _check_applies(rule, p, x.shape[-1], hash_table is not None and input_ids is not None)
    if rule.select == "sparsemixer":
        return _sparsemixer(x, p.top_k, p.jitter)
    s = SCORES[p.score](x)
    choice = (x if rule.bias_on == "logits" else s) if rule.bias_on else s
    if rule.bias_on and bias is not None:
        choice = choice + bias.float().reshape(-1)[: choice.shape[-1]]
    if p.n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, p.n_group, e // p.n_group)
        best = GROUP_SCORES[rule.group][0](grouped).topk(p.topk_group, dim=-1)[1]
        keep = torch.zeros(t, p.n_group, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // p.n_group, dim=1), rule.group_fill)
    if rule.select == "hash":
        idx = hash_table[input_ids.reshape(-1)].long()
    else:
        idx = choice.topk(p.top_k, dim=-1)[1]
    if p.weights == "softmax-topk":
        w = torch.softmax(x.gather(1, idx), dim=-1)
    elif p.weights == "sigmoid-topk":
        w = torch.sigmoid(x.gather(1, idx))
    elif p.weights == "joint-shared":
        lp = F.logsigmoid(torch.cat([x.gather(1, idx), shared], dim=-1))
        w = torch.exp(lp - torch.logsumexp(lp, dim=-1, keepdim=True))[:, : p.top_k]
    else:
        w = s.gather(1, idx)
    if isinstance(p.renorm, str) and p.renorm.startswith("pnorm"):
        w = w / torch.norm(w, p=p.norm_value, dim=-1, keepdim=True)
    elif p.renorm == "clamp-renorm":
        w = w / torch.clamp(w.sum(-1, keepdim=True), min=p.norm_value)
    elif p.renorm:
        w = w / (w.sum(-1, keepdim=True) + rule.eps)
    if per_expert_scale is not None:
        w = w * (per_expert_scale.float()[idx] if per_expert_scale.numel() > 1 else per_expert_scale.float())
    return idx, w * p.scale


def _sparsemixer(scores: torch.Tensor, top_k: int, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer in eval mode (two picks, each a softmax over the logits near its maximum)."""
    idx, w = [], []
    masked = scores
    for _ in range(top_k):
        top, i = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        gates = masked.masked_fill(((top - scores) / factor) > (2 * jitter), float("-inf"))
        w.append(torch.softmax(gates, dim=-1).gather(-1, i))
        idx.append(i)
        masked = torch.scatter(masked, -1, i, float("-inf"))
    return torch.cat(idx, -1), torch.cat(w, -1)


__all__ = ["RouterRule", "RoutingParams", "RuleMismatch", "SCORES", "config_value", "group_floor", "route"]
