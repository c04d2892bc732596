"""Evaluate many expert plans against the full model, fast: the objective every optimizer calls.

Per ``evaluate(plans)`` call the engine
1. normalises plans to one key (layers left out keep all experts) and answers duplicates and repeats from
   a result cache; the unpruned plan gets the objective's known identity value (ESAP exactly 1.0);
2. orders the remaining plans lexicographically by their kept sets (a trie walk), so plans that share the
   first MoE layers are adjacent, and starts each plan from the cached hidden states at the input of its
   first MoE layer whose state is not yet known (``prefix.DecoderRunner``), keeping states later plans need;
3. runs all token rows of a micro-batch in one forward and scores them against the teacher cache, in fp32,
   pooled over scored positions in fp64. Non-finite logits mark that plan failed; others go on.

Multi-fidelity: ``evaluate(plans, rows=r)`` scores only the first micro-batches covering r rows (nested subsets:
the first r rows of the search set), and keeps per-row sums, so raising the fidelity later runs only the rows
not yet scored. A partial value carries its standard error over rows and :func:`paired_difference` compares two
plans on the same rows (per-row differences, so the rows' shared difficulty cancels). Racing (EvoPress's
multi-step selection, arXiv 2410.14649 §3) builds on this; a plan's reported objective is its full value.

Example::

    ev = Evaluator(model, tokens)                               # builds the sparse teacher cache once
    [v] = ev.evaluate([{0: [0, 1, 3], 2: [1, 2]}])
    v.value, v.lo, v.hi                                          # ESAP estimate and certified bounds
    [p] = ev.evaluate([{0: [0, 1]}], rows=4)                     # first 4 rows only: p.rows == 4, p.se
"""
from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from allocopt import defaults
from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.models import describe, mask_experts
from allocopt.models.adapter import pruning_mismatch
from allocopt.models.hooks import input_device
from allocopt.models.quantization import WeightScheme, quantize_experts
from allocopt.runtime.offload import is_offloaded
from allocopt.objectives.layerwise import Job, run_layerwise
from allocopt.objectives.objective import get_objective
from allocopt.objectives.prefix import DecoderRunner, PrefixCache
from allocopt.objectives.rowstats import cluster_se, paired, pooled
from allocopt.objectives.teacher import TeacherCache, build_teacher
from allocopt.plan import check_bits, check_kept, require_compressed_tensors

log = logging.getLogger(__name__)

LayerKey = tuple[tuple[int, ...], int]     # (kept expert ids, bit-width of their weights; 0: the checkpoint's precision)
Key = tuple[LayerKey, ...]                 # per MoE layer, in layer order


@dataclass(frozen=True)
class ObjectiveValue:
    """The objective of one plan on the first ``rows`` rows of the search set (all rows: its full value).

    ``row_sums[i]`` is the sum of the per-position value (the midpoint of the certified interval) over the scored
    positions of row i, ``row_tokens[i]`` how many positions row i scores; ``value`` pools them (sum / tokens).
    """

    value: float | None                    # None when the candidate failed
    lo: float | None
    hi: float | None
    tokens: int                            # scored positions pooled
    failed: str | None = None
    rows: int = 0                          # rows scored (the first ``rows`` of the search set)
    row_sums: tuple[float, ...] = ()       # [rows] per-row sums of the per-position values
    row_tokens: tuple[int, ...] = ()       # [rows] scored positions per row
    layer_tokens: int = 0                  # decoder layer-tokens this engine forwarded for the plan (rows x tokens x layers run)

    @property
    def ok(self) -> bool:
        return self.failed is None

    @property
    def se(self) -> float:
        """Standard error of ``value`` over rows (rows as clusters, ``rowstats.cluster_se``); NaN below 2 rows."""
        return math.nan if self.value is None else cluster_se(np.asarray(self.row_sums), np.asarray(self.row_tokens))


def paired_difference(a: ObjectiveValue, b: ObjectiveValue) -> tuple[float, float]:
    """``a - b`` on the rows both have scored, and its standard error from per-row differences
    (``rowstats.paired``); NaNs when either plan failed. Shapes: ``row_sums`` [rows] each."""
    if a.value is None or b.value is None:
        return math.nan, math.nan
    return paired(np.asarray(a.row_sums), np.asarray(b.row_sums), np.asarray(a.row_tokens))


def _non_finite_rows(logits: torch.Tensor) -> int:
    """Positions whose logits hold a NaN or an infinity: their sum is then non-finite too (one reduction instead of
    a boolean copy of the [n, V] logits; finite fp32 logits never sum past fp32's range over a vocabulary)."""
    return int((~torch.isfinite(logits.float().sum(-1))).sum())


@dataclass
class _RowSums:
    """What one plan has scored so far: per-row sums of the lower/upper per-position terms, per micro-batch."""

    lo: np.ndarray                          # [rows] float64
    hi: np.ndarray                          # [rows] float64
    done: list[bool]                        # [micro-batches]
    failed: str | None = None
    layer_tokens: int = 0                   # rows x tokens x decoder layers forwarded for this plan


class Evaluator:
    """Objective values of expert plans ({layer: kept ids}) for one model and one token set.

    ``batch_size`` rows go through the model per forward; it is also the step of multi-fidelity scoring
    (``evaluate(plans, rows=r)`` scores whole micro-batches, the first ``ceil(r / batch_size)`` of them).
    ``layerwise`` (default: when accelerate offloaded part of the model) scores each ``evaluate`` call's plans one
    decoder layer at a time (``objectives.layerwise``), so each layer's weights are read once per call, not per plan.
    ``head_rows`` runs the LM head on the scored positions only (no [B, T, V] logits to gather from), where a check
    on two rows shows that gives the same logits.
    """

    def __init__(self, model: nn.Module, tokens: TokenSet, objective: str = defaults.OBJECTIVE,
                 tolerance: float = defaults.ESAP_TOLERANCE, exact: bool = False, batch_size: int | None = defaults.ESAP_BATCH_SIZE,
                 prefix_cache_bytes: int = defaults.PREFIX_CACHE_BYTES, prefix_reuse: bool = True,
                 teacher: TeacherCache | None = None, layerwise: bool | None = None, head_rows: bool = True):
        self.model, self.objective = model, get_objective(objective)
        self.layerwise = is_offloaded(model) if layerwise is None else layerwise
        info = describe(model)
        self.info = {l.index: l for l in info.layers}
        self.layers = sorted(info.num_experts)
        self.num_experts, self.top_k = info.num_experts, info.top_k
        self.full: Key = tuple((tuple(range(self.num_experts[l])), 0) for l in self.layers)
        self._scheme: WeightScheme | None = None           # quantized experts' groups, chosen on the first plan with bits
        device = input_device(model)
        bs = batch_size or len(tokens)
        self.batches = [b.to(device) for b in tokens.batches(bs)]
        self.runner = DecoderRunner(model)
        self.prefix = PrefixCache(prefix_cache_bytes)
        self._scored: dict[Key, _RowSums] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        # Starting a forward at a cached layer input must reproduce the full forward (checked once on one row); an
        # offloaded model checks its first and last MoE layers only, since each check is a full read of its weights.
        checked = self.layers[:1] + self.layers[-1:] if self.layerwise else self.layers
        skips = (prefix_reuse or self.layerwise) and self.runner.check(
            self.batches[0].input_ids[:1], self.batches[0].attention_mask[:1], checked)
        self.prefix_reuse = prefix_reuse and skips
        if self.layerwise and not skips:
            log.warning("this model's decoder cannot be started at a cached layer input, so the offloaded model is "
                        "scored one plan at a time (each plan reads every layer's weights)")
            self.layerwise = False
        # The LM head runs on the scored positions only where that gives the full forward's logits there.
        self.head_rows = False
        if head_rows and not self.layerwise:
            self.head_rows = self.runner.check_positions(self.batches[0].input_ids[:2], self.batches[0].attention_mask[:2])
            if not self.head_rows:
                log.warning("this model's LM head cannot run on the scored positions alone; every plan builds full logits")
        mode = "exact" if exact and self.objective.teacher == "sparse" else self.objective.teacher
        if teacher is None:
            teacher = build_teacher(self._teacher_logits, self.batches, mode, tolerance, info.fingerprint, tokens.fingerprint(), bs)
        elif (teacher.model_fingerprint, teacher.tokens_fingerprint, teacher.batch_size) != (info.fingerprint, tokens.fingerprint(), bs) \
                or mode not in (teacher.mode, "targets") and teacher.mode != "exact":
            raise AllocoptError("the given teacher cache was built for another model, token set, batch size or objective; "
                                "drop it so the engine rebuilds it")
        self.teacher = teacher
        # rows of micro-batch c are rows_before[c] .. rows_before[c + 1] - 1; scored positions -> their row
        sizes = [int(b.input_ids.shape[0]) for b in self.batches]
        self.rows_before = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self._position_rows = [torch.div(chunk.positions, b.input_ids.shape[1], rounding_mode="floor")
                               for b, chunk in zip(self.batches, self.teacher.chunks)]
        self.row_tokens = np.concatenate([np.bincount(r.cpu().numpy(), minlength=n) for r, n in zip(self._position_rows, sizes)]
                                         ).astype(np.int64)

    @property
    def direction(self) -> str:
        return self.objective.direction

    @property
    def num_rows(self) -> int:
        """Rows of the search set (what a full-fidelity value scores)."""
        return int(self.rows_before[-1])

    def rows_for(self, rows: int | None) -> int:
        """Rows actually scored when ``rows`` are asked for: rounded up to whole micro-batches, at most all rows."""
        return self.num_rows if rows is None else int(self.rows_before[self._batches_for(rows)])

    def _batches_for(self, rows: int | None) -> int:
        if rows is None:
            return len(self.batches)
        if rows < 1:
            raise AllocoptError(f"a partial score needs at least 1 row (got {rows}); pass rows >= 1 or None for all rows")
        return int(min(len(self.batches), np.searchsorted(self.rows_before, rows, side="left")))

    # ---- plans -----------------------------------------------------------------------------------
    def key(self, plan: Mapping[int, Sequence[int]] | Any) -> Key:
        """Canonical key of a plan (a mapping of kept ids, or an ``allocopt.plan.Plan``, whose layers may carry a
        bit-width); validates ids, top-k and bit-widths."""
        is_plan = hasattr(plan, "kept") and not isinstance(plan, Mapping)
        kept = check_kept(self.info.values(), plan.kept if is_plan else plan, "the plan")
        bits = plan.bits if is_plan else {}
        if bits:
            check_bits(bits.values(), "the plan")
            require_compressed_tensors()
            if self.layerwise:
                raise AllocoptError("plans with quantized experts (--bits) are scored on a model held in memory; this one "
                                    "is offloaded: load it on devices that hold it, or drop --bits")
            unknown = sorted(set(bits) - set(self.layers))
            if unknown:
                raise AllocoptError(f"the plan quantizes layers {unknown}, which are not MoE layers of the model; "
                                    "quantize MoE layers only")
        return tuple((tuple(kept.get(l, range(self.num_experts[l]))), int(bits.get(l, 0))) for l in self.layers)

    def _kept(self, key: Key) -> dict[int, list[int]]:
        return {l: list(k[0]) for l, k, full in zip(self.layers, key, self.full) if k[0] != full[0]}

    def _bits(self, key: Key) -> dict[int, int]:
        return {l: k[1] for l, k in zip(self.layers, key) if k[1]}

    @property
    def scheme(self) -> WeightScheme:
        """The group-wise scheme quantized experts are scored with (the export's: ``WeightScheme.for_model``)."""
        if self._scheme is None:
            self._scheme = WeightScheme.for_model(self.model)
        return self._scheme

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, plans: Sequence[Mapping[int, Sequence[int]] | Any], rows: int | None = None) -> list[ObjectiveValue]:
        """Values of ``plans`` on the first ``rows`` rows (rounded up to micro-batches; None: all rows, the full value).

        Rows a plan has already scored (in any earlier call) are never run again.
        """
        need = self._batches_for(rows)
        keys = [self.key(p) for p in plans]
        if self.full in keys and self.full not in self._scored and self.objective.identity_value is not None:
            v = self.objective.identity_value * self.row_tokens.astype(np.float64)
            self._scored[self.full] = _RowSums(v, v.copy(), [True] * len(self.batches))
        todo = sorted({k for k in keys if not self._has(k, need)})
        self.counters["requested"] += len(keys)
        self.counters["evaluated"] += len(todo)
        for k in set(keys) - set(todo):
            self._touch(k)
        if todo:
            self._run(todo, need)
        return [self._value(k, need) for k in keys]

    def _has(self, key: Key, need: int) -> bool:
        s = self._scored.get(key)
        return s is not None and (s.failed is not None or all(s.done[:need]))

    def _run(self, todo: list[Key], need: int) -> None:
        n = len(self.layers)
        for k in todo:
            self._scored.setdefault(k, _RowSums(np.zeros(self.num_rows), np.zeros(self.num_rows), [False] * len(self.batches)))
        if self.layerwise:
            return self._run_layerwise(todo, need)
        for c in range(need):
            batch = self.batches[c]
            keys = [k for k in todo if self._scored[k].failed is None and not self._scored[k].done[c]]
            demand = collections.Counter((i, k[:i]) for k in keys for i in range(n))
            for k in keys:
                for i in range(n):
                    demand[(i, k[:i])] -= 1
                start, hidden = self._start(c, k)
                capture = [self.layers[i] for i in range(start + 1, n)] if self.prefix_reuse else []
                positions = self.teacher.chunks[c].positions if self.head_rows else None
                bits = self._bits(k)
                with mask_experts(self.model, self._kept(k)), quantize_experts(self.model, bits, self.scheme if bits else None):
                    logits, states = self.runner.run(batch.input_ids, batch.attention_mask, self.layers[start] if start >= 0 else 0,
                                                     hidden, capture, positions)
                run = len(self.runner.layers) - (self.layers[start] if start >= 0 else 0)
                self.counters["layers_run"] += run
                self.counters["layer_tokens"] += run * batch.input_ids.numel()
                self._scored[k].layer_tokens += run * batch.input_ids.numel()
                for i in range(max(start + 1, 0), n):
                    if self.layers[i] in states:
                        self.prefix.put((c, i, k[:i]), states[self.layers[i]], protect=demand[(i, k[:i])] > 0)
                self._score(k, c, logits)
            self.prefix.release()

    def _run_layerwise(self, todo: list[Key], need: int) -> None:
        """The same values as :meth:`_run`, one decoder layer at a time for the whole population (models larger
        than memory: each layer's weights are read once per call, not once per plan; ``objectives.layerwise``)."""
        jobs = []
        for k in todo:
            for c in range(need):
                if self._scored[k].failed is None and not self._scored[k].done[c]:
                    start, state = self._start(c, k)
                    jobs.append(Job(c, k, start, state))

        def on_state(c: int, i: int, prefix: Key, state) -> None:
            if self.prefix_reuse:
                self.prefix.put((c, i, prefix), state)

        def on_logits(job: Job, logits: torch.Tensor, layer_tokens: int) -> None:
            self.counters["layer_tokens"] += layer_tokens
            self._scored[job.key].layer_tokens += layer_tokens
            if self._scored[job.key].failed is None:
                self._score(job.key, job.batch, logits)

        run_layerwise(self.model, self.runner, self.layers, self.full, self.batches, jobs, on_state, on_logits)
        self.counters["layerwise_passes"] += 1

    def _score(self, k: Key, c: int, logits: torch.Tensor) -> None:
        """Record plan ``k``'s per-row sums on micro-batch ``c`` from its logits (or its failure): [B, T, V], or
        [n, V] at the micro-batch's scored positions already (``head_rows``)."""
        chunk, first = self.teacher.chunks[c], int(self.rows_before[c])
        size = int(self.batches[c].input_ids.shape[0])
        sel = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])[chunk.positions]
        bad = _non_finite_rows(sel)
        if bad:
            self._scored[k].failed = f"non-finite logits at {bad} of {sel.shape[0]} scored positions"
            return
        a, b = self.objective.terms(sel, chunk)
        rows = self._position_rows[c]
        scored = self._scored[k]
        scored.lo[first:first + size] = torch.zeros(size, dtype=torch.float64, device=a.device).index_add_(
            0, rows, a.double()).cpu().numpy()
        scored.hi[first:first + size] = torch.zeros(size, dtype=torch.float64, device=b.device).index_add_(
            0, rows, b.double()).cpu().numpy()
        scored.done[c] = True

    def _value(self, key: Key, need: int) -> ObjectiveValue:
        r = int(self.rows_before[need])
        row_tokens = self.row_tokens[:r]
        total = int(row_tokens.sum())
        s = self._scored[key]
        if s.failed is not None or total == 0:
            return ObjectiveValue(None, None, None, total, s.failed or f"the first {r} rows score no position", rows=r,
                                  layer_tokens=s.layer_tokens)
        sums = (s.lo[:r] + s.hi[:r]) / 2
        return ObjectiveValue(pooled(sums, row_tokens), float(s.lo[:r].sum()) / total, float(s.hi[:r].sum()) / total,
                              total, rows=r, row_sums=tuple(float(x) for x in sums),
                              row_tokens=tuple(int(t) for t in row_tokens), layer_tokens=s.layer_tokens)

    @torch.no_grad()
    def score_model(self, other: nn.Module, planned: Mapping[int, int] | None = None) -> ObjectiveValue:
        """The objective of another model on the same tokens against this teacher, e.g. an exported checkpoint,
        which should score exactly what its plan scored under masking. Raises AllocoptError when ``other`` cannot be
        a pruned copy of this model, or hold ``planned`` (layer -> experts its plan keeps): ``pruning_mismatch``."""
        why = pruning_mismatch(self.model, other, planned)
        if why is not None:
            raise AllocoptError(f"the pruned model is not a pruned copy of the full model ({why}); score it against "
                                "the model it was pruned from (--model), or export its plan again (allocopt prune)")
        device = input_device(other)
        lo = hi = 0.0
        for batch, chunk in zip(self.batches, self.teacher.chunks):
            logits = other(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                           use_cache=False).logits.to(batch.input_ids.device)
            sel = logits.reshape(-1, logits.shape[-1])[chunk.positions]
            bad = _non_finite_rows(sel)
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
