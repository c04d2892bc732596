"""The checkpoint in transformers' in-memory layout, written a slice of experts at a time, for offloaded loads.

Published MoE checkpoints (OLMoE, Qwen-MoE, Mixtral, DeepSeek...) store one tensor per expert
(``mlp.experts.E.gate_proj.weight``); transformers 5 fuses them at load time (``mlp.experts.gate_up_proj``, shape
``[E, 2I, H]``) with the family's ``WeightConverter`` rules. Under a device map that sends weights to disk, its loader
materialises every source tensor of a fused target plus the fused result before writing it to the offload folder,
and reads the shards through memory maps: for OLMoE-1B-7B that is about 1.5 GB of copies and as many mapped pages
for a 600 MiB limit, and one fused tensor of a DeepSeek-V3 layer alone is 7.5 GB.

:func:`converted_checkpoint` runs the same conversion (transformers' own renaming and converter objects from
``get_model_conversion_mapping``, the key matching of ``rename_source_key``) ahead of the load, one slice of experts
at a time, reading only those experts' tensors (``readinto``, no mapping) and appending the slice's rows to the
target's safetensors file. It writes a checkpoint directory beside the offload folder: the converted targets as new
files, every other tensor copied one at a time into files of their own, and an index over both (a copy of the
checkpoint, as transformers' own disk offload makes of every tensor it converts). transformers then
loads that directory with nothing left to convert, so its disk offload points at the files instead of copying them.
A converter whose operations are not known to act on each expert separately is run on all its tensors at once (one
target in memory); the result is the same either way (``tests/test_offload_layouts.py``).
"""
from __future__ import annotations

import copy
import json
import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (Concatenate, MergeModulelist, Transpose, WeightConverter,
                                             WeightRenaming, WeightTransform, dot_natural_key, rename_source_key)

from allocopt import defaults
from allocopt.io import atomic_directory, atomic_write_text
from allocopt.models.pruned import loading_error
from allocopt.runtime.offload import SAFETENSORS_DTYPES, read_header, read_tensor

VIEW_DIR = ".allocopt-converted"          # inside --offload-dir
INDEX_FILE = "model.safetensors.index.json"
STAMP_FILE = "source.json"
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items() if dtype is not None}


def checkpoint_tensors(path: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of the safetensors checkpoint in ``path`` (its index, or its one file)."""
    index = path / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    return {name: "model.safetensors" for name in read_header(str(path / "model.safetensors"))[1]
            if name != "__metadata__"}


def _row_separable(converter: WeightConverter) -> bool:
    """The converter stacks one tensor per expert along a new first dimension and then only joins or transposes
    along later dimensions, so converting experts ``e0..e1`` gives rows ``e0..e1`` of the whole result."""
    ops = converter.operations
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    for op in ops[1:]:
        if isinstance(op, Concatenate) and op.dim >= 1:
            continue
        if isinstance(op, Transpose) and not op.check_dims and min(op.dim0, op.dim1) >= 1:
            continue
        return False
    return True


class _Target:
    """One fused target of one converter: its checkpoint tensors, in the order transformers collects them."""

    def __init__(self, name: str, converter: WeightConverter):
        self.name, self.converter = name, converter
        self.sources: dict[str, list[str]] = defaultdict(list)     # source pattern -> checkpoint names

    def experts(self) -> int | None:
        """How many tensors each source pattern has (one per expert), when that number is the same for all."""
        counts = {len(v) for v in self.sources.values()}
        return counts.pop() if len(counts) == 1 else None

    def convert(self, start: int, stop: int, read: Any, skeleton: nn.Module) -> dict[str, torch.Tensor]:
        """transformers' conversion of source tensors ``start:stop`` of every pattern (all of them: ``0:None``)."""
        converter = copy.deepcopy(self.converter)                # as transformers does: one instance per target
        for pattern, names in self.sources.items():
            for name in names[start:stop]:
                converter.add_tensor(self.name, name, pattern, lambda name=name: read(name))
        return converter.convert(self.name, model=skeleton, config=skeleton.config)


def _plan(path: Path, skeleton: nn.Module) -> tuple[dict[str, str], dict[str, _Target], list[WeightTransform]]:
    """``(tensors loaded as stored -> shard, converter targets, the transforms the checkpoint's names matched)`` for
    the checkpoint in ``path`` loaded as ``skeleton``."""
    mapping = get_model_conversion_mapping(skeleton)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = skeleton.state_dict()
    as_stored: dict[str, str] = {}
    targets: dict[str, _Target] = {}
    tensors = checkpoint_tensors(path)
    for name in sorted(tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, skeleton.base_model_prefix, meta)
        if pattern is None or renamed not in meta:
            as_stored[name] = tensors[name]            # renamed (or refused) by transformers itself at load time
            continue
        target = targets.setdefault(renamed, _Target(renamed, by_pattern[pattern]))
        target.sources[pattern].append(name)
    return as_stored, targets, [m for m in mapping if m.was_used()]


def _stamp(path: Path, tensors: dict[str, str]) -> str:
    files = sorted(set(tensors.values()))
    return json.dumps({"transformers": transformers.__version__, "source": str(path.resolve()),
                       "files": [[f, (path / f).stat().st_size, (path / f).stat().st_mtime_ns] for f in files]})


Slices = Callable[[], Iterator[torch.Tensor]]


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.dtype, list[int], Slices]]) -> None:
    """A safetensors file of ``(name, dtype, shape, slices)``: each tensor is the concatenation of what ``slices()``
    yields along dim 0, written as it comes (the header is written first from the declared dtypes and shapes; every
    slice is checked against them)."""
    entries, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        entries[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, dtype, shape, slices in tensors:
            written = 0
            for chunk in slices():
                if chunk.dtype != dtype or list(chunk.shape[1:]) != list(shape[1:]):
                    raise ValueError(f"{name}: a slice of shape {list(chunk.shape)} {chunk.dtype} in a tensor of "
                                     f"{list(shape)} {dtype}")
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            start, stop = entries[name]["data_offsets"]
            if written != stop - start:
                raise ValueError(f"{name}: wrote {written} bytes of {stop - start}")


def _write_target(target: _Target, out: Path, read: "_Reader", skeleton: nn.Module, shape: torch.Size,
                  slice_bytes: int) -> dict[str, str]:
    """Write what ``target``'s converter makes into one file in ``out`` (``shape``: the target's in the model);
    returns ``{tensor name: file}``."""
    file = f"{target.name}.safetensors"
    n = target.experts()
    if n is None or len(target.converter.target_patterns) != 1 or not _row_separable(target.converter):
        made = {k: v[0] if isinstance(v, list) else v for k, v in target.convert(0, None, read, skeleton).items()}
        _write_safetensors(out / file, [(k, v.dtype, list(v.shape), lambda v=v: iter([v])) for k, v in made.items()])
        return dict.fromkeys(made, file)
    first = {pattern: read.entry(names[0]) for pattern, names in target.sources.items()}
    dtypes = {SAFETENSORS_DTYPES[e["dtype"]] for e in first.values()}
    per_expert = sum(SAFETENSORS_DTYPES[e["dtype"]].itemsize * int(torch.Size(e["shape"]).numel())
                     for e in first.values())
    step = max(1, min(n, slice_bytes // max(1, per_expert)))
    if len(dtypes) != 1:
        raise ValueError(f"{target.name}: its checkpoint tensors have different dtypes ({sorted(map(str, dtypes))})")

    def slices() -> Iterator[torch.Tensor]:
        for e0 in range(0, n, step):
            (value,) = target.convert(e0, min(n, e0 + step), read, skeleton).values()
            if value.shape[0] != min(n, e0 + step) - e0:
                raise ValueError(f"{target.name}: experts {e0}.. converted to shape {list(value.shape)}, "
                                 f"not rows of {[n, *shape[1:]]}")
            yield value

    _write_safetensors(out / file, [(target.name, dtypes.pop(), [n, *shape[1:]], slices)])
    return {target.name: file}


def _write_as_stored(as_stored: dict[str, str], out: Path, read: "_Reader") -> dict[str, str]:
    """Tensors transformers loads without converting, copied one at a time into one file per source shard (the
    source shards cannot be linked: transformers loads every tensor a listed file holds, experts included)."""
    files: dict[str, str] = {}
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in as_stored.items():
        by_shard[shard].append(name)
    for shard, names in sorted(by_shard.items()):
        file = f"as-stored-{shard}"
        entries = [read.entry(n) for n in names]
        _write_safetensors(out / file, [(n, SAFETENSORS_DTYPES[e["dtype"]], e["shape"], lambda n=n: iter([read(n)]))
                                        for n, e in zip(names, entries)])
        files.update(dict.fromkeys(names, file))
    return files


class _Reader:
    """Checkpoint tensors by name, each read into its own memory (``offload.read_tensor``), headers cached."""

    def __init__(self, path: Path, tensors: dict[str, str]):
        self.path, self.tensors, self.headers = path, tensors, {}

    def entry(self, name: str) -> dict:
        return read_header(str(self.path / self.tensors[name]), self.headers)[1][name]

    def __call__(self, name: str) -> torch.Tensor:
        return read_tensor(str(self.path / self.tensors[name]), name, self.headers)


class Converted(NamedTuple):
    """Where to load from, and the transforms a load of the original checkpoint would have used (transformers keeps
    those on the model as ``_weight_conversions``; ``save_pretrained`` and the exports reverse exactly them)."""
    path: Path
    transforms: list[WeightTransform] | None


def converted_checkpoint(path: Path, skeleton: nn.Module, offload_dir: Path,
                         slice_bytes: int = defaults.STREAM_SLICE_BYTES) -> Converted:
    """Where to load ``path`` from under disk offload: ``path`` itself (``transforms`` None) when transformers has
    nothing to convert for ``skeleton`` (a meta-device instance of the class that will load it), else a converted copy
    in ``offload_dir/.allocopt-converted`` (made once; rebuilt when the checkpoint's files change)."""
    try:
        as_stored, targets, used = _plan(path, skeleton)
        if not targets:
            return Converted(path, None)
        view = Path(offload_dir) / VIEW_DIR
        tensors = checkpoint_tensors(path)
        stamp = _stamp(path, tensors)
        if (view / STAMP_FILE).is_file() and (view / STAMP_FILE).read_text() == stamp:
            return Converted(view, used)
        read = _Reader(path, tensors)
        with atomic_directory(view, overwrite=True) as tmp:
            try:
                weight_map = _write_as_stored(as_stored, tmp, read)
                shapes = {name: t.shape for name, t in skeleton.state_dict().items()}
                for target in targets.values():
                    weight_map.update(_write_target(target, tmp, read, skeleton, shapes[target.name], slice_bytes))
                for extra in ("config.json", "generation_config.json"):
                    if (path / extra).is_file():
                        os.symlink((path / extra).resolve(), tmp / extra)
                (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
                atomic_write_text(tmp / STAMP_FILE, stamp)
            except (OSError, ValueError) as exc:     # a shard missing or damaged, or the offload folder out of room
                raise loading_error(exc, path, str(offload_dir)) from exc
    except (OSError, ValueError) as exc:
        raise loading_error(exc, path, str(offload_dir)) from exc
    return Converted(view, used)


__all__ = ["VIEW_DIR", "Converted", "checkpoint_tensors", "converted_checkpoint"]
