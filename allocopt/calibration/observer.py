"""One calibration pass that records, per MoE layer and expert, what the criteria need.

How routing is captured (transformers-moe.md §A.5): almost every fused experts module is called as
``experts(hidden [T,H], top_k_index [T,K], top_k_weights [T,K])``. Those arguments ARE the family's routing
decision: the selected experts and the gate weights the model applies, after selection biases, grouping,
renormalisation and scaling. So the observer never re-derives gates from router logits (no second softmax,
no top-k on the wrong tensor). ``allocopt.models.calls`` gives the same view for the families that call their
experts otherwise (Llama-4, JetMoE); for each block call the observer

* runs the experts on ``hidden.repeat_interleave(K)`` with one expert per row and weight 1, giving each
  (token, slot)'s unweighted expert output f [T,K,H] at the cost of the normal forward (for the standard call
  that result also becomes the block's output, so nothing is computed twice);
* accumulates n, sum g, sum ||f||, sum g||f||, sum ||f||^2, sum g^2||f||^2 and max |f_i| over REAL tokens
  (the attention mask of the batch, flattened in the same [B*T] order as the block's hidden rows);
* returns ``(f * w).sum(slots)``, so the model's output is what it would have been.

Slots that are not routed experts are left out of the statistics: zero/identity experts (ids >= E, LongCat)
and a skip class (weight exactly 0, Zaya).

Non-finite numbers (a float16 router whose logits overflow to inf, NaN weights) are refused at the first
batch that shows them: the router's outputs, the gate weights and the expert outputs of real tokens must all
be finite, else ``observe`` raises one AllocoptError naming the layer and the dtype, and nothing is returned
(so nothing is saved or ranked). Statistics of an overflowed router would rank the busiest experts last.

Expert similarity (for GRAPE-style redundancy): for at most ``similarity_tokens`` real tokens per batch,
evenly spaced over the batch's real tokens, every expert is run once; the similarity of experts i, j is the
mean over those tokens of cos(f_i(x), f_j(x)). That pass runs experts on tokens the router never sends them, so an
output that overflows there says nothing about the model: such tokens are left out of that expert's pairs (unlike
routed outputs, which must be finite). Cosine (not CKA/MSE) because it is scale-free, bounded in
[-1, 1] and accumulates as a plain running mean.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from tqdm.auto import tqdm

from allocopt import defaults
from allocopt.calibration.stats import RoutingStats
from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.models import describe, find_moe_blocks
from allocopt.models.calls import experts_call, restore
from allocopt.runtime.decoder import DecoderRunner, resident
from allocopt.runtime.expert_slices import slice_size, sliceable, sliced_experts
from allocopt.models.hooks import input_device


class _LayerRecorder:
    """Accumulators of one MoE layer; ``mask`` is set to the current batch's flattened real-token mask."""

    def __init__(self, stats: RoutingStats, layer: int, num_experts: int, similarity_tokens: int, skip_zero_weight: bool):
        self.stats, self.layer, self.num_experts = stats, layer, num_experts
        self.skip_zero_weight = skip_zero_weight
        self.similarity_tokens = similarity_tokens
        self.mask: torch.Tensor | None = None
        self.sim_sum = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        self.sim_count = torch.zeros(num_experts, num_experts, dtype=torch.float64)   # tokens per pair (both finite)

    def __call__(self, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, expert_fn) -> torch.Tensor:
        t, k = idx.shape
        if self.mask is None or self.mask.numel() != t:
            raise AllocoptError(f"layer {self.layer}: experts saw {t} token rows but the batch has "
                                f"{None if self.mask is None else self.mask.numel()}; this model calls its experts in an unsupported way")
        f = expert_fn(hidden.repeat_interleave(k, 0), idx.reshape(-1)).view(t, k, -1)
        self.check_finite("gate weights", w)
        self.check_finite("expert outputs", f)
        self._accumulate(idx, w, f)
        if self.similarity_tokens > 0:
            self._similarity(expert_fn, hidden, rows_per_call=t * k)
        return (f * w[..., None].to(f.dtype)).sum(1).to(hidden.dtype)

    def check_finite(self, what: str, values: torch.Tensor) -> None:
        """Refuse inf/NaN in ``values`` [T, ...] on this batch's real tokens (padding rows may hold anything)."""
        if values.shape[0] == self.mask.numel():
            values = values[self.mask.to(values.device)]
        if bool(torch.isfinite(values).all()):
            return
        dtype = str(values.dtype).removeprefix("torch.")
        fix = ("float16 overflows here: load the model in bfloat16 or float32 (--dtype bfloat16)" if values.dtype == torch.float16
               else "the checkpoint's weights produce inf/NaN: check them, or load the model in float32 (--dtype float32)")
        raise AllocoptError(f"layer {self.layer}: {what} are not finite (inf/NaN) in {dtype}, so no statistics were saved; {fix}")

    def router_hook(self, module: torch.nn.Module, args, output) -> None:
        """Forward hook on the router: its logits (every floating tensor it returns) must be finite."""
        for value in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.check_finite("router logits", value)

    def _accumulate(self, idx: torch.Tensor, w: torch.Tensor, f: torch.Tensor) -> None:
        # per-(token, slot) reductions first, in fp32, so no full-size fp64 copy of f is ever made
        slots = self.mask.to(idx.device)[:, None] & (idx < self.num_experts)
        if self.skip_zero_weight:
            slots &= w != 0
        norm = torch.linalg.vector_norm(f, dim=-1, dtype=torch.float32)[slots].reshape(-1).double().cpu()
        peak = f.abs().amax(dim=-1)[slots].reshape(-1).double().cpu()
        idx, g = idx[slots].reshape(-1).cpu(), w[slots].reshape(-1).double().cpu()
        s, n, e = self.stats, self.layer, self.num_experts
        s.count[n] += torch.bincount(idx, minlength=e).double()
        s.gate_sum[n] += torch.bincount(idx, weights=g, minlength=e)
        s.norm_sum[n] += torch.bincount(idx, weights=norm, minlength=e)
        s.gate_norm_sum[n] += torch.bincount(idx, weights=g * norm, minlength=e)
        s.sq_norm_sum[n] += torch.bincount(idx, weights=norm * norm, minlength=e)
        s.gate2_sq_norm_sum[n] += torch.bincount(idx, weights=(g * norm) ** 2, minlength=e)
        s.max_act[n] = s.max_act[n].scatter_reduce(0, idx, peak, "amax")

    def _similarity(self, expert_fn, hidden: torch.Tensor, rows_per_call: int) -> None:
        rows = self.mask.nonzero().squeeze(1)
        if rows.numel() > self.similarity_tokens:  # evenly spaced, deterministic
            rows = rows[torch.linspace(0, rows.numel() - 1, self.similarity_tokens).round().long()]
        e = self.num_experts
        chunk = max(1, rows_per_call // (4 * e))  # each extra call a quarter of the routed forward: its fp32 outputs stay small
        for part in rows.split(chunk):
            m = part.numel()
            x = hidden[part.to(hidden.device)].repeat_interleave(e, 0)
            experts = torch.arange(e, device=hidden.device).repeat(m)
            out = expert_fn(x, experts).view(m, e, -1).float()
            finite = torch.isfinite(out).all(-1)                      # [m, e]
            unit = torch.nn.functional.normalize(torch.where(finite[..., None], out, 0.0), dim=-1)
            self.sim_sum += torch.einsum("tih,tjh->ij", unit, unit).double().cpu()
            self.sim_count += (finite.T.double() @ finite.double()).cpu()

    def finish(self) -> None:
        if self.sim_count.any():
            sim = torch.where(self.sim_count > 0, self.sim_sum / self.sim_count.clamp(min=1), 0.0)
            self.stats.similarity[self.layer] = sim.float()


@contextmanager
def _sliced(blocks, slice_bytes: int) -> Iterator[None]:
    """Offloaded experts run a slice of ``slice_bytes`` at a time (``runtime.expert_slices``); installed before the
    recorders so that their ``expert_fn`` calls the sliced forward."""
    with ExitStack() as stack:
        for b in blocks:
            if sliceable(b):
                stack.enter_context(sliced_experts(b, slice_size(b, slice_bytes)))
        yield


@contextmanager
def _wrapped(blocks, recorders) -> Iterator[None]:
    """Listen to every block's experts call (``allocopt.models.calls``) and hook each router (finite logits);
    whatever was there before is restored."""
    saved: list = []
    hooks = []
    try:
        for b, rec in zip(blocks, recorders):
            saved.extend(experts_call(b).intercept(b, rec))
            hooks.append(b.router.register_forward_hook(rec.router_hook))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        restore(saved)


def _set_mask(recorders: list[_LayerRecorder], batch: TokenSet) -> None:
    real = batch.attention_mask.reshape(-1).bool().cpu()  # [B*T], the row order of the blocks' flattened hidden
    for rec in recorders:
        rec.mask = real


def _layer_by_layer(model: torch.nn.Module, batches: list[TokenSet], recorders: list[_LayerRecorder], progress: bool) -> None:
    """Every batch through decoder layer 0, then through layer 1, ...: one read of each layer's weights."""
    runner = DecoderRunner(model)
    states: list = [None] * len(batches)
    embeddings = [runner.embed(b.input_ids, b.attention_mask) for b in batches]   # before any layer is resident
    with tqdm(total=len(runner.layers) * len(batches), desc="observe (layer by layer)", disable=not progress,
              unit="batch") as bar:
        for index, layer in enumerate(runner.layers):
            with resident(layer):
                for i, batch in enumerate(batches):
                    _set_mask(recorders, batch)
                    states[i], embeddings[i] = runner.run_layer(batch.input_ids, batch.attention_mask, index, states[i],
                                                                embeddings[i])
                    bar.update()


def observe(model: torch.nn.Module, tokens: TokenSet, batch_size: int = defaults.CALIBRATION_BATCH_SIZE, progress: bool = True,
            similarity_tokens: int = defaults.SIMILARITY_TOKENS, layer_major: bool | None = None,
            slice_bytes: int = defaults.STREAM_SLICE_BYTES) -> RoutingStats:
    """Run ``tokens`` through ``model`` once and return the per-expert routing statistics.

    Memory is bounded by the accumulators (O(E^2) per layer); nothing grows with the number of tokens.
    ``similarity_tokens=0`` skips the similarity pass (the matrices then stay zero).

    ``layer_major`` (default: when accelerate offloaded some weights) streams the model instead: every row goes
    through decoder layer 0, then every row through layer 1, ..., each layer's weights read once and resident only
    while it runs, the rows' hidden states kept between layers; statistics equal the batch-by-batch pass. There an
    offloaded experts module is read ``slice_bytes`` of experts at a time (``runtime.expert_slices``), so memory holds
    the layer's attention and one slice, not all its experts.
    """
    if batch_size < 1:
        raise AllocoptError(f"batch_size must be >= 1 (got {batch_size}); pass a positive --batch-size")
    blocks = find_moe_blocks(model)  # raises AllocoptError for a dense model
    unsupported = [b.info.path for b in blocks if b.info.storage == "modulelist"]
    if unsupported:
        raise AllocoptError(f"{', '.join(unsupported)} store experts as a module list; the observer needs stacked experts "
                            "(transformers >= 5 MoE classes)")
    stats = RoutingStats.empty(describe(model).fingerprint, tokens.fingerprint(),
                               {b.info.index: b.info.num_experts for b in blocks})
    recorders = [_LayerRecorder(stats, b.info.index, b.info.num_experts, similarity_tokens, b.family.router_tail == "skip")
                 for b in blocks]
    device = input_device(model)
    batches = [b.to(device) for b in tokens.batches(batch_size)]
    if layer_major is None:
        layer_major = any(p.device.type == "meta" for p in model.parameters())
    with torch.inference_mode(), _sliced(blocks if layer_major else [], slice_bytes), _wrapped(blocks, recorders):
        if layer_major:
            _layer_by_layer(model, batches, recorders, progress)
        else:
            for batch in tqdm(batches, desc="observe", disable=not progress, unit="batch"):
                _set_mask(recorders, batch)
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    stats.num_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    for rec in recorders:
        rec.finish()
    stats.check_finite("the observed statistics")
    return stats
