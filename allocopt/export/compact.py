"""Writing a pruned checkpoint: the compact export (each layer its own expert count), streamed one decoder layer at a
time for an offloaded model, or the exact padded export; with its modelling code, plan.json and a model card.

    save_pruned(model, tokenizer, "out/", plan)        # prunes in place, writes safetensors atomically
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from allocopt.errors import AllocoptError
from allocopt.export.mtp import carry_mtp, settle_mtp
from allocopt.export.padded import PADDED_ATTR, pad_model
from allocopt.export.quantized import write_quantized
from allocopt.export.remote_code import write_modeling_code
from allocopt.export.source_format import keep_source_format, source_quantization
from allocopt.export.streamed import write_streamed
from allocopt.io import atomic_directory, atomic_write_text
from allocopt.models.adapter import decoder_layers, describe, find_moe_blocks
from allocopt.models.quantization import plan_scheme
from allocopt.models.surgery import checked_kept, prune_model, record_counts
from allocopt.plan import PLAN_FILE, Plan, require_compressed_tensors
from allocopt.runtime.offload import is_offloaded

log = logging.getLogger(__name__)


def save_pruned(model: nn.Module, tokenizer: Any, out_dir: str | Path, plan: Plan | Mapping[int, Sequence[int]],
                card: str | Callable[[Any], str] | None = None, overwrite: bool = False, progress: bool = False,
                self_contained: bool = True, pad: bool = False) -> Path:
    """Write the pruned checkpoint (safetensors, the model's dtype) atomically to ``out_dir``.

    ``model`` is pruned in place first unless it already has the plan's counts (no second copy of the
    weights is ever made); a model accelerate offloaded is pruned and written one decoder layer at a time
    (``export.streamed.write_streamed``). Writes plan.json (for a ``Plan``) and README.md (``card``, or ``card(info)``
    of the pruned model) beside the weights. A plan with bits (``LayerPlan.bits``) gets those layers' routed experts
    packed in compressed-tensors' pack-quantized format (``export.quantized``), the values ESAP scored.
    ``self_contained``: where layers differ in count, also write the checkpoint's own modelling code (``auto_map``,
    ``allocopt.export.remote_code``) so that plain transformers loads it with ``trust_remote_code=True``.
    ``pad``: the exact padded export instead (``allocopt.export.padded.pad_model``, applied here unless ``model`` is
    padded already): one expert count in every layer, loadable by stock transformers and vLLM; AllocoptError for
    families where it cannot be exact, or for an offloaded model (padding needs the weights in memory).
    """
    kept = plan.kept if isinstance(plan, Plan) else {int(l): tuple(k) for l, k in plan.items()}
    bits = plan.bits if isinstance(plan, Plan) else {}
    if bits:
        require_compressed_tensors()
    if bits and source_quantization(getattr(model, "name_or_path", None)) is not None:
        raise AllocoptError("the plan quantizes experts but the source checkpoint is quantized already; search and "
                            "export plans with bits from a checkpoint at full precision (bf16/fp16/fp32)")
    scheme = plan_scheme(model, plan) if bits else None     # before pruning: the widths the plan was scored with
    current = {b.layer: b.info.num_experts for b in find_moe_blocks(model)}
    streamed = is_offloaded(model)
    if pad:
        if streamed:
            raise AllocoptError("--pad needs the whole model in memory and this one is offloaded; export without --pad "
                                "(streamed, compact) or give it more memory (--max-memory)")
        if not getattr(model, PADDED_ATTR, False):
            if isinstance(plan, Plan):
                plan.validate_for(describe(model))
            pad_model(model, kept)
    elif streamed:
        kept = checked_kept(model, plan)
    elif any(current.get(l) != len(k) for l, k in kept.items()):
        prune_model(model, plan, progress=progress)
    carried = settle_mtp(model)              # the source's MTP layers go along whole, or the config claims none
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if streamed:
            write_streamed(model, {l: list(k) for l, k in kept.items()}, tmp, progress=progress)
            record_counts(model)
            model.config.save_pretrained(tmp)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)      # eos ids and sampling defaults, as save_pretrained
        else:
            model.save_pretrained(tmp)
        _source_format(model, tmp, kept, pad)
        if carried:
            carry_mtp(model, tmp)
        if bits:
            write_quantized(tmp, bits, scheme, decoder_layers(model)[0])
        if self_contained:
            write_modeling_code(model, tmp)
        if callable(card):                         # the card names the unpruned model's fingerprint, not this one's
            card = card(describe(model, fingerprint=False))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if isinstance(plan, Plan):
            plan.save(tmp / PLAN_FILE)
        if card is not None:
            atomic_write_text(tmp / "README.md", card)
    return out_dir


def _source_format(model: nn.Module, out: Path, kept: Mapping[int, Sequence[int]], pad: bool) -> None:
    """A pre-quantized source gets its format back (``export.source_format``), or a log line saying the export holds
    its dequantized weights: never silently a different format."""
    source = getattr(model, "name_or_path", None)
    quantization = source_quantization(source)
    if quantization is None:
        return
    method = quantization.get("quant_method")
    if not pad and keep_source_format(out, Path(source), kept):
        log.info("kept the source's %s format: quantized tensors copied as stored, quantization_config kept", method)
        return
    why = "--pad writes new experts" if pad else f"allocopt cannot copy quant_method {method!r} expert by expert"
    log.warning("the source checkpoint is quantized (quant_method %r) and %s: the export holds its dequantized "
                "weights (%s); quantize it again (e.g. with llm-compressor) to serve it in that format",
                method, why, str(model.dtype).removeprefix("torch."))


__all__ = ["save_pruned"]
