"""Export a pruned checkpoint from a model that does not fit in memory: one decoder layer at a time.

``save_pruned`` of a model accelerate offloaded (to CPU or disk) comes here. Each decoder layer's weights are read
once (``decoder.resident``), its MoE block pruned, its tensors written to the current safetensors shard, and the
layer offloaded again before the next one, so memory holds about one layer; shards are cut at ``max_shard_bytes``
and indexed in ``model.safetensors.index.json`` as transformers writes them. Tensors are written under the names
``save_pretrained`` gives them (transformers' reverse of its load-time conversion, applied a decoder layer at a
time), so the streamed export holds the same tensors under the same names as an in-memory one.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import revert_weight_conversion

from allocopt import defaults
from allocopt.models.adapter import decoder_layers, find_moe_blocks, invalidate
from allocopt.models.surgery import prune_block
from allocopt.runtime.decoder import resident
from allocopt.runtime.offload import SAFETENSORS_DTYPES

INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items() if dtype is not None}  # the inverse


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each (a larger tensor gets a shard of its own).

    Each tensor's bytes go to disk as soon as it is added (a shard's data file, given its header when the shard is
    closed), so memory holds one tensor, never a shard. The files are what ``safetensors.torch.save_file`` writes
    (8-byte header length, JSON header padded to 8 bytes, tensors back to back)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), int(max_bytes)
        self.entries: dict[str, dict] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0
        self._data: BinaryIO | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.pending_bytes + size > self.max_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self.directory / f".shard-{len(self.files) + 1:05d}.data", "wb+")
        t = tensor.detach().to("cpu").contiguous()
        self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.pending_bytes, self.pending_bytes + size]}
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        data = self._data or open(self.directory / f".shard-{len(self.files) + 1:05d}.data", "wb+")
        with open(self.directory / name, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            data.seek(0)
            shutil.copyfileobj(data, out, 16 << 20)
        data.close()
        Path(data.name).unlink()
        self.files.append((name, list(self.entries)))
        self.entries, self.pending_bytes, self._data = {}, 0, None

    def finish(self) -> None:
        """Write the last shard, give every shard its final -of- name and write the index (one file: no index)."""
        if self.entries or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.directory / self.files[0][0]).rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (name, keys) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.directory / name).rename(self.directory / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def replace_shards(out: Path, staging: Path) -> None:
    """Make the shards (and index) a ShardWriter finished in ``staging`` the checkpoint's tensors in ``out``: the old
    safetensors files and index go, the new ones move in, ``staging`` is removed."""
    for old in [*out.glob("*.safetensors"), out / INDEX_FILE]:
        old.unlink(missing_ok=True)
    for new in staging.iterdir():
        shutil.move(str(new), out / new.name)
    staging.rmdir()


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's direct parameters and persistent buffers (what its state dict holds without children)."""
    yield from module.named_parameters(recurse=False)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if n not in skip)


def _tied_names(model: nn.Module) -> set[str]:
    """Names of tensors that are another name's tensor (tied embeddings), found before any weight moves."""
    first: dict[int, str] = {}
    later = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if id(t) in first:
            later.add(name)
        else:
            first[id(t)] = name
    return later


def write_streamed(model: nn.Module, kept: dict[int, list[int]], directory: Path,
                   max_shard_bytes: int = defaults.EXPORT_SHARD_BYTES, progress: bool = False) -> None:
    """Prune ``model`` (an accelerate-dispatched model) layer by layer and write its weights to ``directory``."""
    list_name, layers = decoder_layers(model)
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    writer = ShardWriter(directory, max_shard_bytes)
    tied = _tied_names(model)                                    # tied weights are written once, under one name

    def write(group: dict[str, torch.Tensor]) -> None:
        """Tensors under the names ``save_pretrained`` writes: transformers' own reverse of its load-time conversion
        (per-expert tensors for most families) applied to the group, tied names left out."""
        for name, tensor in revert_weight_conversion(model, {k: v for k, v in group.items() if k not in tied}).items():
            writer.add(name, tensor)

    for name, module in model.named_modules():                  # everything outside the decoder layers, module by module
        if name != list_name and not name.startswith(f"{list_name}.") and any(True for _ in _own_tensors(module)):
            with resident(module):
                prefix = f"{name}." if name else ""
                write({f"{prefix}{n}": t for n, t in _own_tensors(module)})
    for index, layer in enumerate(tqdm(layers, desc="pruning layers", unit="layer", disable=not progress)):
        with resident(layer):
            block = blocks.get(index)
            if block is not None and index in kept and len(kept[index]) < block.info.num_experts:
                prune_block(block, kept[index])
            prefix = f"{list_name}.{index}."                     # one decoder layer at a time, converted together
            write({f"{prefix}{sub}.{n}" if sub else f"{prefix}{n}": t
                   for sub, child in layer.named_modules() for n, t in _own_tensors(child)})
    writer.finish()
    invalidate(model)


__all__ = ["INDEX_FILE", "ShardWriter", "replace_shards", "write_streamed"]
