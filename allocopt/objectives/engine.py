"""Evaluate many expert plans against the full model, fast: the objective every optimizer calls.

Per ``evaluate(plans)`` call the engine
1. normalises plans to one key (layers left out keep all experts) and answers duplicates and repeats from
   a result cache; the unpruned plan gets the objective's known identity value (ESAP exactly 1.0);
2. orders the remaining plans lexicographically by their kept sets (a trie walk), so plans that share the
   first MoE layers are adjacent, and starts each plan from the cached hidden states at the input of its
   first MoE layer whose state is not yet known (``prefix.DecoderRunner``), keeping states later plans need;
3. runs all token rows of a micro-batch in one forward and scores them against the teacher cache, in fp32,
   pooled over scored positions in fp64. Non-finite logits mark that plan failed; others go on.

Example::

    ev = Evaluator(model, tokens)                               # builds the sparse teacher cache once
    [v] = ev.evaluate([{0: [0, 1, 3], 2: [1, 2]}])
    v.value, v.lo, v.hi                                          # ESAP estimate and certified bounds
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from allocopt import defaults
from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.models import describe, mask_experts
from allocopt.models.adapter import kept_problem
from allocopt.models.hooks import input_device
from allocopt.objectives.objective import get_objective
from allocopt.objectives.prefix import DecoderRunner, PrefixCache
from allocopt.objectives.teacher import TeacherCache, build_teacher

Key = tuple[tuple[int, ...], ...]          # kept expert ids per MoE layer, in layer order


@dataclass(frozen=True)
class ObjectiveValue:
    value: float | None                    # None when the candidate failed
    lo: float | None
    hi: float | None
    tokens: int                            # scored positions pooled
    failed: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None


class Evaluator:
    """Objective values of expert plans ({layer: kept ids}) for one model and one token set."""

    def __init__(self, model: nn.Module, tokens: TokenSet, objective: str = defaults.OBJECTIVE,
                 tolerance: float = defaults.ESAP_TOLERANCE, exact: bool = False, batch_size: int | None = defaults.ESAP_BATCH_SIZE,
                 prefix_cache_bytes: int = defaults.PREFIX_CACHE_BYTES, prefix_reuse: bool = True,
                 teacher: TeacherCache | None = None):
        self.model, self.objective = model, get_objective(objective)
        info = describe(model)
        self.info = {l.index: l for l in info.layers}
        self.layers = sorted(info.num_experts)
        self.num_experts, self.top_k = info.num_experts, info.top_k
        self.full: Key = tuple(tuple(range(self.num_experts[l])) for l in self.layers)
        device = input_device(model)
        bs = batch_size or len(tokens)
        self.batches = [b.to(device) for b in tokens.batches(bs)]
        self.runner = DecoderRunner(model)
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.results: dict[Key, ObjectiveValue] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.prefix_reuse = prefix_reuse and self.runner.check(self.batches[0].input_ids[:1], self.batches[0].attention_mask[:1], self.layers)
        mode = "exact" if exact and self.objective.teacher == "sparse" else self.objective.teacher
        if teacher is None:
            teacher = build_teacher(self._teacher_logits, self.batches, mode, tolerance, info.fingerprint, tokens.fingerprint(), bs)
        elif (teacher.model_fingerprint, teacher.tokens_fingerprint, teacher.batch_size) != (info.fingerprint, tokens.fingerprint(), bs) \
                or mode not in (teacher.mode, "targets") and teacher.mode != "exact":
            raise AllocoptError("the given teacher cache was built for another model, token set, batch size or objective; "
                                "drop it so the engine rebuilds it")
        self.teacher = teacher

    @property
    def direction(self) -> str:
        return self.objective.direction

    # ---- plans -----------------------------------------------------------------------------------
    def key(self, plan: Mapping[int, Sequence[int]] | Any) -> Key:
        """Canonical key of a plan (a mapping or an ``allocopt.plan.Plan``); validates ids and top-k."""
        kept = plan.kept if hasattr(plan, "kept") and not isinstance(plan, Mapping) else plan
        unknown = sorted(set(int(l) for l in kept) - set(self.layers))
        if unknown:
            raise AllocoptError(f"plan names layers {unknown} that are not MoE layers (MoE layers: {self.layers}); use decoder-layer indices from `allocopt info`")
        out = []
        for l in self.layers:
            ids = tuple(sorted({int(e) for e in kept.get(l, kept.get(str(l), range(self.num_experts[l])))}))
            problem = kept_problem(self.info[l], ids)
            if problem:
                raise AllocoptError(f"plan keeps {list(ids)} in layer {l}: the layer {problem}; fix the plan")
            out.append(ids)
        return tuple(out)

    def _kept(self, key: Key) -> dict[int, list[int]]:
        return {l: list(k) for l, k, full in zip(self.layers, key, self.full) if k != full}

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, plans: Sequence[Mapping[int, Sequence[int]] | Any]) -> list[ObjectiveValue]:
        keys = [self.key(p) for p in plans]
        if self.full in keys and self.full not in self.results and self.objective.identity_value is not None:
            v = self.objective.identity_value
            self.results[self.full] = ObjectiveValue(v, v, v, self.teacher.num_scored)
        todo = sorted({k for k in keys if k not in self.results})
        self.counters["requested"] += len(keys)
        self.counters["evaluated"] += len(todo)
        for k in set(keys) - set(todo):
            self._touch(k)
        if todo:
            self._run(todo)
        return [self.results[k] for k in keys]

    def _run(self, todo: list[Key]) -> None:
        n = len(self.layers)
        lo = {k: 0.0 for k in todo}
        hi = dict(lo)
        failed: dict[Key, str] = {}
        for c, (batch, chunk) in enumerate(zip(self.batches, self.teacher.chunks)):
            demand = collections.Counter((i, k[:i]) for k in todo if k not in failed for i in range(n))
            for k in todo:
                if k in failed:
                    continue
                for i in range(n):
                    demand[(i, k[:i])] -= 1
                start, hidden = self._start(c, k)
                capture = [self.layers[i] for i in range(start + 1, n)] if self.prefix_reuse else []
                with mask_experts(self.model, self._kept(k)):
                    logits, states = self.runner.run(batch.input_ids, batch.attention_mask, self.layers[start] if start >= 0 else 0,
                                                     hidden, capture)
                self.counters["layers_run"] += len(self.runner.layers) - (self.layers[start] if start >= 0 else 0)
                for i in range(max(start + 1, 0), n):
                    if self.layers[i] in states:
                        self.prefix.put((c, i, k[:i]), states[self.layers[i]], protect=demand[(i, k[:i])] > 0)
                sel = logits.reshape(-1, logits.shape[-1])[chunk.positions]
                bad = int((~torch.isfinite(sel)).any(-1).sum())
                if bad:
                    failed[k] = f"non-finite logits at {bad} of {sel.shape[0]} scored positions"
                    continue
                a, b = self.objective.terms(sel, chunk)
                lo[k] += float(a.double().sum())
                hi[k] += float(b.double().sum())
            self.prefix.release()
        total = self.teacher.num_scored
        for k in todo:
            if k in failed:
                self.results[k] = ObjectiveValue(None, None, None, total, failed[k])
            else:
                l, h = lo[k] / total, hi[k] / total
                self.results[k] = ObjectiveValue((l + h) / 2, l, h, total)

    @torch.no_grad()
    def score_model(self, other: nn.Module) -> ObjectiveValue:
        """The objective of another model on the same tokens against this teacher, e.g. an exported checkpoint,
        which should score exactly what its plan scored under masking."""
        device = input_device(other)
        lo = hi = 0.0
        for batch, chunk in zip(self.batches, self.teacher.chunks):
            logits = other(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                           use_cache=False).logits.to(batch.input_ids.device)
            sel = logits.reshape(-1, logits.shape[-1])[chunk.positions]
            bad = int((~torch.isfinite(sel)).any(-1).sum())
            if bad:
                return ObjectiveValue(None, None, None, self.teacher.num_scored,
                                      f"non-finite logits at {bad} of {sel.shape[0]} scored positions")
            a, b = self.objective.terms(sel, chunk)
            lo, hi = lo + float(a.double().sum()), hi + float(b.double().sum())
        total = self.teacher.num_scored
        return ObjectiveValue((lo + hi) / 2 / total, lo / total, hi / total, total)

    def _start(self, c: int, key: Key) -> tuple[int, torch.Tensor | None]:
        """Deepest MoE-layer position i whose input state for this key's prefix is cached (-1: none)."""
        if self.prefix_reuse:
            for i in range(len(self.layers) - 1, -1, -1):
                h = self.prefix.get((c, i, key[:i]))
                if h is not None:
                    self.counters["prefix_hits"] += 1
                    return i, h
        return -1, None

    def _touch(self, key: Key) -> None:
        """Keep an often-requested plan's (e.g. an elite parent's) states warm for its children."""
        for c in range(len(self.batches)):
            for i in range(len(self.layers)):
                self.prefix.get((c, i, key[:i]))

    def _teacher_logits(self, c: int, batch: TokenSet) -> torch.Tensor:
        """Full-model logits through the same runner the candidates use; keeps its layer-input states
        (every plan shares the state at the input of the first MoE layer)."""
        start, hidden = self._start(c, self.full)
        capture = self.layers[start + 1:] if self.prefix_reuse else []
        logits, states = self.runner.run(batch.input_ids, batch.attention_mask, self.layers[start] if start >= 0 else 0, hidden, capture)
        for i, l in enumerate(self.layers):
            if l in states:
                self.prefix.put((c, i, self.full[:i]), states[l])
        return logits

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "prefix_cache": self.prefix.stats(), "teacher_bytes": self.teacher.nbytes,
                "teacher_mean_tail": self.teacher.mean_tail, "prefix_reuse": self.prefix_reuse}
