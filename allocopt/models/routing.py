"""Router rules as data, a reference implementation of each, and a probe that checks a rule against the real router.

A rule says how a router turns its logits ``[T, R]`` into what the experts receive, ``(top_k_index [T, K],
top_k_weights [T, K])``. It is composed of a few steps that cover every router in transformers 5.x:

    logits -> [softcap] -> score (softmax | sigmoid | sqrt-softplus | logits) -> [+ selection bias]
           -> [group-limited: keep the best topk_group of n_group groups] -> top-k (or sparsemixer | hash table)
           -> weights (the chosen scores | softmax or sigmoid of the chosen logits | joint with shared experts)
           -> [renorm | p-norm | clamped renorm] -> [x scale]

``route(rule, params, logits, ...)`` runs those steps; :func:`verify` runs the real model once with hooks on each
MoE block and checks that the rule, run on the logits the router produced, reproduces the indices and weights
the experts were called with. The family table (``families.py``) is checked this way in the tests, and a model
type missing from the table gets its rule inferred the same way (:func:`infer`), never guessed.

Group-limited routing (DeepSeek-V3 ``n_group``/``topk_group``) is also where pruning constraints come from:
a group is scored by the sum of its best two experts (``top2-sum``) or by its best one (``max``), so every group
must keep the same number of experts (structural removal re-partitions groups otherwise) and at least what its
group score reads, and the kept groups must hold at least top-k experts (:func:`group_floor`).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from allocopt.models.hooks import input_device

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


# ---- the probe ------------------------------------------------------------------------------------------------------

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
def observe_routing(model: nn.Module) -> Iterator[dict[int, Observed]]:
    """Inside the context every MoE block records its router logits and the (indices, weights) its experts get."""
    from allocopt.models.adapter import find_moe_blocks
    from allocopt.models.calls import experts_call, restore
    from allocopt.models.hooks import shadow_forward

    seen: dict[int, Observed] = {}
    saved: list = []
    try:
        for b in find_moe_blocks(model):
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
        except (RuntimeError, IndexError, KeyError, TypeError, ValueError):
            return False
        skip = block.family.router_tail == "skip"
        a_idx, a_w = _canonical(idx.long().reshape(ref_idx.shape[0], -1), w.reshape(ref_idx.shape[0], -1), block.info.num_experts, skip)
        b_idx, b_w = _canonical(ref_idx, ref_w, block.info.num_experts, skip)
        if a_idx.shape != b_idx.shape or not torch.equal(a_idx, b_idx):
            return False
        if not torch.allclose(a_w, b_w, rtol=rtol, atol=1e-5):
            return False
    return True


def probe(model: nn.Module, tokens: int = 24, seed: int = 0) -> tuple[dict[int, Observed], torch.Tensor]:
    """One forward of ``tokens`` random token ids with routing recorded; returns (records per layer, input ids)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(3, max(4, vocab), (1, tokens), generator=torch.Generator().manual_seed(seed))
    device = input_device(model)
    with torch.no_grad(), observe_routing(model) as seen:
        model(input_ids=ids.to(device), use_cache=False)
    return seen, ids.reshape(-1)


def verify(model: nn.Module) -> dict[int, bool]:
    """Per MoE layer: does the family's rule reproduce what the real router did on random tokens?"""
    from allocopt.models.adapter import find_moe_blocks

    seen, ids = probe(model)
    return {b.layer: matches(b.family.rule, b.params, b, seen[b.layer], ids) for b in find_moe_blocks(model)}


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


def infer(model: nn.Module) -> dict[int, RouterRule | None]:
    """Per MoE layer, the simplest candidate rule that reproduces the real router; None where none does."""
    from allocopt.models.adapter import find_moe_blocks

    seen, ids = probe(model)
    out: dict[int, RouterRule | None] = {}
    for b in find_moe_blocks(model):
        found = None
        groups = b.family.group_fields or ("n_group", "topk_group")
        for rule in _candidates(b.choice_bias() is not None, config_value(b.config, groups[0]) not in (None, 1)):
            params = RoutingParams.resolve(rule, b.config, b.info.top_k, groups)
            if matches(rule, params, b, seen[b.layer], ids):
                found = rule
                break
        out[b.layer] = found
    return out


__all__ = ["RouterRule", "RoutingParams", "config_value", "group_floor", "infer", "matches", "observe_routing",
           "probe", "route", "verify"]
