"""Pruned exports of a pre-quantized checkpoint, written in the checkpoint's own format.

transformers loads a block-FP8 checkpoint (``quantization_config.quant_method == "fp8"``: DeepSeek-V3/R1, Qwen3-FP8,
GLM-4.5-FP8; ``weight`` in float8_e4m3fn plus a ``weight_scale_inv`` per 128x128 block) dequantized wherever FP8
kernels are missing (every CPU), and ``save_pretrained`` of that model writes dense bf16 without the
``quantization_config``: about twice the bytes of the source, and a different format from the one the engine served.

:func:`keep_source_format` rewrites such an export from the source files: every tensor the source stored quantized
is copied as stored (the FP8 values and their scales, an expert taken from its original index), every other tensor
is the export's own (routers with the dropped experts' rows removed) in the source's dtype, and the source's
``quantization_config`` goes back into config.json. Dequantizing the result gives exactly the weights that were
scored. Formats this module cannot copy expert by expert are exported dequantized, and :func:`source_quantization`
lets the caller say so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.export.streamed import ShardWriter, replace_shards
from allocopt.io import atomic_write_json
from allocopt.runtime.converted import checkpoint_tensors
from allocopt.runtime.offload import SAFETENSORS_DTYPES, read_header, read_tensor

KEPT_FORMATS = {"fp8": "_scale_inv"}      # quant_method -> suffix of the scale stored beside each quantized weight
_EXPERT = re.compile(r"^(?P<head>.*\.layers\.(?P<layer>\d+)\..*\.experts\.)(?P<expert>\d+)(?P<tail>\..+)$")


def source_quantization(source: str | Path | None) -> dict[str, Any] | None:
    """The ``quantization_config`` of the checkpoint at ``source`` (None for a dense one, or no such directory)."""
    config = Path(source) / "config.json" if source else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config") or None


def refuse_packed_source(quantization: Any, source: str | Path | None) -> None:
    """Refuse a source whose routed experts allocopt packed at int4/int8 (an export of a plan with bits; its
    ``quantization``: the config's ``quantization_config``): searching or pruning it again would count and write its
    experts at full precision (a bigger "pruned" model, budgets of the wrong size) and quantize them again."""
    from allocopt.models.quantization import packs_experts

    if packs_experts(quantization):
        raise AllocoptError(f"--model {source} is an allocopt export whose routed experts are packed at int4/int8; "
                            "search and prune the full-precision checkpoint it was made from")


def _source_name(name: str, kept: Mapping[int, Sequence[int]]) -> str:
    """The source tensor an exported tensor came from: expert ``j`` of a pruned layer is the ``j``-th kept expert in
    increasing order (``models.surgery.prune_block``)."""
    m = _EXPERT.match(name)
    if m is None or int(m["layer"]) not in kept:
        return name
    original = sorted(int(e) for e in kept[int(m["layer"])])[int(m["expert"])]
    return f"{m['head']}{original}{m['tail']}"


def keep_source_format(out: Path, source: Path, kept: Mapping[int, Sequence[int]],
                       max_shard_bytes: int = defaults.EXPORT_SHARD_BYTES) -> bool:
    """Rewrite the export in ``out`` (written from ``source`` loaded dequantized, pruned to ``kept``) in the source's
    quantized format. Returns False, changing nothing, when the source's format is not one of :data:`KEPT_FORMATS`
    or a quantized tensor cannot be copied whole (experts fused in one stored tensor)."""
    quantization = source_quantization(source)
    suffix = KEPT_FORMATS.get((quantization or {}).get("quant_method"))
    if suffix is None:
        return False
    exported, stored = checkpoint_tensors(out), checkpoint_tensors(source)
    headers: dict[str, tuple[int, dict]] = {}

    def entry(directory: Path, files: dict[str, str], name: str) -> dict:
        return read_header(str(directory / files[name]), headers)[1][name]

    quantized = {name: _source_name(name, kept) for name in exported}
    quantized = {name: origin for name, origin in quantized.items() if origin in stored and origin + suffix in stored}
    if any(entry(out, exported, n)["shape"] != entry(source, stored, o)["shape"] for n, o in quantized.items()):
        return False            # e.g. experts fused on disk: a stored tensor holds dropped experts too, cannot be copied
    staging = out / ".source-format"
    staging.mkdir()
    writer = ShardWriter(staging, max_shard_bytes)
    for name in sorted(exported):
        origin = quantized.get(name) or _source_name(name, kept)
        if name in quantized:                                         # stored quantized: copied as stored, with its scale
            writer.add(name, read_tensor(str(source / stored[origin]), origin, headers))
            writer.add(name + suffix, read_tensor(str(source / stored[origin + suffix]), origin + suffix, headers))
            continue
        value = read_tensor(str(out / exported[name]), name, headers)
        if origin in stored:                                          # dense in the source too: its dtype back
            value = value.to(SAFETENSORS_DTYPES[entry(source, stored, origin)["dtype"]])
        writer.add(name, value)
    writer.finish()
    replace_shards(out, staging)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization
    for key in ("dtype", "torch_dtype"):
        if key in source_config:
            config[key] = source_config[key]
    atomic_write_json(out / "config.json", config)
    return True


__all__ = ["KEPT_FORMATS", "keep_source_format", "source_quantization"]
