"""Multi-token-prediction (MTP) layers in an export: carried whole, or said to be absent, never silently claimed.

DeepSeek-V3/R1, GLM-4.5 and others publish MTP modules (``num_nextn_predict_layers``; transformers' ``num_mtp_layers``)
as extra decoder layers after the trunk (``model.layers.{num_hidden_layers + k}.*``, each an MoE layer with the full
expert set) that transformers' causal LM skips on load and ``MtpModel.from_pretrained(model)`` loads for
``generate(use_mtp=True)``; vLLM loads them for its MTP speculative decoding. allocopt scores and prunes the trunk.

Where the source checkpoint holds its MTP layers, the export carries them whole (:func:`carry_mtp`): their tensors
copied as stored into a shard of their own (indexed), ``num_mtp_layers`` kept, and the count field set to the MTP
layers' full expert count (the trunk's pruned counts are ``layer_num_experts``, so every loader builds the trunk
layer by layer and the MTP layer at its full size). Their bytes are part of the export's size model
(:func:`mtp_bytes`). Where the config claims MTP layers the checkpoint does not hold, the export says
``num_mtp_layers = 0`` (transformers' DeepSeek-V3 config defaults to one).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from allocopt.io import atomic_write_json
from allocopt.models.adapter import find_moe_blocks, text_config
from allocopt.runtime.converted import checkpoint_tensors
from allocopt.runtime.offload import read_header

MTP_FILE = "model-mtp.safetensors"
_LAYER = re.compile(r"layers\.(\d+)\.")


def mtp_tensors(source: Any, first_extra_layer: int) -> dict[str, str]:
    """Stored name -> file of every tensor of the MTP layers (decoder layer indices at or above ``first_extra_layer``)
    a source checkpoint directory holds; empty for a source that is not a directory of safetensors files."""
    if not source or not Path(str(source)).is_dir():
        return {}
    try:
        names = checkpoint_tensors(Path(str(source)))
    except (OSError, ValueError, KeyError):
        return {}
    return {n: f for n, f in names.items() if (m := _LAYER.search(n)) and int(m.group(1)) >= first_extra_layer}


def mtp_weights_in(source: Any, first_extra_layer: int) -> int:
    """MTP layers whose weights a source checkpoint directory holds."""
    return len({int(_LAYER.search(n).group(1)) for n in mtp_tensors(source, first_extra_layer)})


def _source_and_first(model: Any) -> tuple[Any, int, int]:
    config = text_config(model)
    return getattr(model, "name_or_path", None), int(config.num_hidden_layers), int(getattr(config, "num_mtp_layers", 0) or 0)


def mtp_bytes(model: Any) -> int:
    """Bytes of the MTP layers' tensors the export of ``model`` carries (0 when it carries none)."""
    source, first, claimed = _source_and_first(model)
    if not claimed:
        return 0
    held, headers = mtp_tensors(source, first), {}
    total = 0
    for name, file in held.items():
        entry = read_header(str(Path(str(source)) / file), headers)[1][name]
        total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return total


def settle_mtp(model: Any) -> bool:
    """Before saving: True when the export will carry the source's MTP layers (:func:`carry_mtp` after saving); else
    the export config's MTP layer count is set to 0 (it holds none) and False."""
    source, first, claimed = _source_and_first(model)
    if not claimed:
        return False
    if mtp_tensors(source, first):
        return True
    config = text_config(model)
    for target in {id(model.config): model.config, id(config): config}.values():
        if getattr(target, "num_mtp_layers", None):
            target.num_mtp_layers = 0
    return False


def carry_mtp(model: Any, out: Path) -> int:
    """Copy the source's MTP layers as stored into ``out`` (written by ``save_pretrained``): a shard of their own
    (:data:`MTP_FILE` beside a sharded export; a single-file export becomes two indexed shards), the index updated, and
    the count field in config.json set to the MTP layers' full expert count. Returns the tensors copied."""
    from allocopt.export.streamed import INDEX_FILE, ShardWriter
    from allocopt.runtime.offload import read_tensor

    source, first, _ = _source_and_first(model)
    held = mtp_tensors(source, first)
    source = Path(str(source))
    staging = out / ".mtp"
    staging.mkdir()
    writer, headers = ShardWriter(staging, 1 << 62), {}
    for name in sorted(held):
        writer.add(name, read_tensor(str(source / held[name]), name, headers))
    writer.finish()
    index = out / INDEX_FILE
    if index.is_file():
        data, mtp_file = json.loads(index.read_text()), MTP_FILE
    else:                 # one file: two indexed shards (transformers reads a lone model.safetensors, not an index)
        trunk, mtp_file = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        (out / "model.safetensors").rename(out / trunk)
        names = read_header(str(out / trunk))[1]
        data = {"metadata": {}, "weight_map": {n: trunk for n in names if n != "__metadata__"}}
    shutil.move(str(staging / "model.safetensors"), out / mtp_file)
    staging.rmdir()
    data["weight_map"].update({n: mtp_file for n in held})
    data["metadata"]["total_size"] = sum(
        v["data_offsets"][1] - v["data_offsets"][0] for f in sorted(set(data["weight_map"].values()))
        for k, v in read_header(str(out / f))[1].items() if k != "__metadata__")
    atomic_write_json(index, data)
    family = find_moe_blocks(model)[0].family
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    field = family.count_field.split(".")[-1]
    if field in config and field in source_config:
        config[field] = max(int(config[field]), int(source_config[field]))
    atomic_write_json(out / "config.json", config)
    return len(held)


__all__ = ["MTP_FILE", "carry_mtp", "mtp_bytes", "mtp_tensors", "mtp_weights_in", "settle_mtp"]
