"""Memory behaviour of accelerate's offload for models streamed one layer at a time on a CPU.

Two things decide the peak memory of a layer-streamed pass (``observe``, ``esap``, ``prune`` under ``--max-memory``):

* **Room for the streamed layer.** On GPUs accelerate reserves the largest layer on the execution device when it
  offloads (``infer_auto_device_map``), since offloaded layers run there. When the CPU itself executes, nothing is
  reserved: ``cpu=600MiB`` fills 600 MiB with resident weights (embedding, head...) and each streamed layer comes on
  top. :func:`reserve_streamed_layer` makes the limit mean what it says (resident weights + the layer being run):
  the CPU budget shrinks by the largest decoder layer whenever the model does not fit whole.
* **One copy per weight read.** accelerate reads a disk-offloaded weight through a memory map and copies it
  (``np.memmap`` -> ``torch.tensor``; for safetensors-backed entries ``safe_open().get_tensor``), so for a moment the
  file pages and the copy both count in the process's RSS. :func:`install_direct_reads` makes those reads go through
  ``readinto`` into the tensor that is returned: one copy, no file mapping. Values are bit-identical.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import nn

# safetensors dtype names -> torch (streaming.py writes with the inverse)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
           "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def reserve_streamed_layer(max_memory: dict[Any, Any], skeleton: nn.Module, dtype: torch.dtype | None) -> dict[Any, Any]:
    """``max_memory`` with the CPU budget reduced by the largest decoder layer when only the CPU executes and the model
    (``skeleton``, on the meta device) does not fit in that budget; unchanged otherwise (bytes, accelerate's units)."""
    from accelerate.utils import compute_module_sizes, convert_file_size_to_int

    from allocopt.models.adapter import decoder_layers

    if "cpu" not in max_memory or any(not isinstance(k, str) for k in max_memory) or torch.cuda.is_available():
        return max_memory
    sizes = compute_module_sizes(skeleton, dtype=dtype)
    budget = convert_file_size_to_int(max_memory["cpu"])
    if sizes[""] <= budget:
        return max_memory
    list_name, layers = decoder_layers(skeleton)
    largest = max(sizes[f"{list_name}.{i}"] for i in range(len(layers)))
    return {**max_memory, "cpu": max(0, budget - largest)}


def read_header(path: str, cache: dict[str, tuple[int, dict]] | None = None) -> tuple[int, dict]:
    """``(offset where tensor data starts, JSON header)`` of the safetensors file ``path``: its 8-byte header length
    and the header, nothing else. ValueError when those bytes are not a safetensors header (a file shorter than the
    length it announces, text that is not a JSON object); OSError when the file cannot be read."""
    cache = {} if cache is None else cache
    if path not in cache:
        with open(path, "rb") as f:
            raw, size = f.read(8), os.fstat(f.fileno()).st_size
            if len(raw) < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:                # also UnicodeDecodeError
                raise ValueError(f"header is not JSON: {exc}") from exc
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            cache[path] = (8 + n, header)
    return cache[path]


def tensor_bytes(directory) -> int:
    """Bytes of every tensor in the safetensors files of checkpoint ``directory`` (from their headers)."""
    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        header = read_header(str(file))[1]
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def read_tensor(path: str, name: str, cache: dict[str, tuple[int, dict]] | None = None) -> torch.Tensor:
    """Tensor ``name`` of the safetensors file ``path``, read with ``readinto`` into its own memory (no mmap)."""
    start, header = read_header(path, cache)
    entry = header[name]
    out = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    _read_into(path, start + entry["data_offsets"][0], out, name)
    return out


def stored_shape(path: str, name: str, cache: dict[str, tuple[int, dict]] | None = None) -> list[int]:
    """The shape tensor ``name`` has in the safetensors file ``path`` (from its header; nothing else is read)."""
    return list(read_header(path, cache)[1][name]["shape"])


def read_rows(path: str, name: str, start: int, stop: int, cache: dict[str, tuple[int, dict]] | None = None
              ) -> torch.Tensor:
    """Rows ``start:stop`` of tensor ``name`` (along its first dimension, e.g. experts ``start..stop-1`` of a fused
    ``[E, ...]`` tensor), read with ``readinto``: only those rows' bytes are read."""
    begin, header = read_header(path, cache)
    entry = header[name]
    shape = list(entry["shape"])
    out = torch.empty([stop - start, *shape[1:]], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    row = out[0].numel() * out.element_size() if out.numel() else 0
    _read_into(path, begin + entry["data_offsets"][0] + start * row, out, name)
    return out


def _read_into(path: str, offset: int, out: torch.Tensor, name: str) -> None:
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{path} ends inside tensor {name}")
            done += got


class DirectReads(Mapping):
    """accelerate's ``OffloadedWeightsLoader`` with safetensors-backed entries read by :func:`read_tensor`."""

    def __init__(self, loader: Any):
        self.loader, self._headers = loader, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.loader.index.get(key) if key not in self.loader.state_dict else None
        if info is None or info.get("safetensors_file") is None or self.loader.device not in (None, "cpu"):
            return self.loader[key]
        return self._converted(info, read_tensor(info["safetensors_file"], info.get("weight_name", key), self._headers))

    def first_dim(self, key: str) -> int | None:
        """Size of the stored tensor's first dimension for a safetensors-backed ``key`` (header only), else None."""
        info = self.loader.index.get(key) or {}
        if not info.get("safetensors_file"):
            return None
        return (stored_shape(info["safetensors_file"], info.get("weight_name", key), self._headers) or [None])[0]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a safetensors-backed ``key`` (:func:`read_rows`), in the dtype the model uses."""
        info = self.loader.index[key]
        return self._converted(info, read_rows(info["safetensors_file"], info.get("weight_name", key), start, stop,
                                               self._headers))

    @staticmethod
    def _converted(info: dict, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(getattr(torch, info["dtype"])) if "dtype" in info else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def install_direct_reads(model: nn.Module) -> int:
    """Route every offloading hook of ``model`` through :class:`DirectReads`; returns how many hooks now do."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    wrapped: dict[int, DirectReads] = {}
    count = 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:                 # a SequentialHook holds several
            weights = getattr(h, "weights_map", None)
            if isinstance(weights, PrefixedDataset) and isinstance(weights.dataset, OffloadedWeightsLoader):
                direct = wrapped.setdefault(id(weights.dataset), DirectReads(weights.dataset))
                h.weights_map = PrefixedDataset(direct, weights.prefix)
                count += 1
    return count


def is_offloaded(model: nn.Module) -> bool:
    """Some weights live on CPU or disk behind accelerate hooks (the model is on the meta device there)."""
    return any(p.device.type == "meta" for p in model.parameters())


__all__ = ["is_offloaded", "SAFETENSORS_DTYPES", "DirectReads", "install_direct_reads", "read_header", "read_rows", "read_tensor",
           "reserve_streamed_layer", "stored_shape"]
