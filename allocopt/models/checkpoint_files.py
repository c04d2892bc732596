"""Which safetensors files hold a checkpoint directory's weights, in the order transformers reads them: the single
``model.safetensors`` when there is one, else the shards ``model.safetensors.index.json`` names. The load-time check
of a checkpoint (``allocopt.runtime.loading``) and the model's identity (``allocopt.models.identity``) both read it.
"""
from __future__ import annotations

import json
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_shards(directory: Path) -> tuple[Path | None, dict[str, list[str]]]:
    """``(index file or None, {shard file name: tensor names the index places there})`` of ``directory``; the single
    file maps to ``[]`` (its header lists its tensors) and a directory with neither to ``{}``. Raises ValueError
    (naming what is wrong) for an index that is not a JSON object whose ``weight_map`` maps tensors to file names."""
    if (directory / SINGLE_FILE).is_file():
        return None, {SINGLE_FILE: []}
    index = directory / INDEX_FILE
    if not index.is_file():
        return None, {}
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError("weight_map is not an object of file names")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    return index, shards


__all__ = ["INDEX_FILE", "SINGLE_FILE", "weight_shards"]
