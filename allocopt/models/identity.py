"""What makes two models the same model: the identity behind ``describe(model).fingerprint``.

The fingerprint is the sha256 of

* the essentials: the model's class, its structure as discovered (decoder layers, routed experts per MoE layer),
  the dtypes its weights are held in, and its config (``to_dict()`` less runtime-only keys: ``_name_or_path``,
  ``_attn_implementation``, ``transformers_version``, ...);
* every tensor of the checkpoint the model is, or would be written as by ``save_pretrained`` (tied copies dropped,
  transformers' load-time weight conversions reverted): name, safetensors dtype, shape and sha256 of its bytes,
  sorted by name. Sharding and the safetensors header metadata play no part.

So the fingerprint covers every tensor that changes the model's outputs (routers, experts, attention, embeddings,
norms, selection biases) and the config that says how they are used. It is dtype-dependent: a bfloat16 copy of a
float32 model scores plans differently, so it is another model (its statistics, teacher cache and studies are its
own). The same weights saved again (any shard size) and reloaded keep their fingerprint, and a model built in
memory has the fingerprint of the checkpoint ``save_pretrained`` writes from it.

Where the per-tensor digests come from:

* a model :func:`record_checkpoint` was called on (``allocopt.runtime.load_model`` does it) whose files and tensors
  are unchanged since loading: the checkpoint's safetensors files, hashed in streamed chunks, once per machine: the
  digests are cached in ``<cache dir>/digests/<sha256 of the checkpoint directory>.json``, one entry per file keyed
  by (resolved path, size, mtime_ns, ctime_ns, inode), so a command on an already-hashed checkpoint only stats its
  files. The cache dir is ``$ALLOCOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/allocopt``, else ``~/.cache/allocopt``; it
  keeps the ``DIGEST_CACHE_MAX_FILES`` checkpoints used last, and an unwritable one only costs the next command
  another read.
* otherwise (a model built in memory, one changed in place after loading, checkpoint files rewritten since):
  the model's own tensors. "Changed in place" is what torch's version counters and tensor objects show: a write
  through ``param.data`` (which has a counter of its own) goes unseen, so change weights under ``torch.no_grad()``.
  A model with weights on the meta device (offloaded) that was not loaded by allocopt cannot be fingerprinted this
  way and is refused.

``legacy_fingerprint`` in ``adapter.py`` is the scheme before this one (config essentials and router weights only),
kept so a stored study made with it is refused with a message that says so instead of "another model".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.models.checkpoint_files import weight_shards

log = logging.getLogger(__name__)

SCHEME = "allocopt.identity/2"           # hashed first, so a later scheme never collides with this one
_ATTR = "_allocopt_checkpoint"           # set on a model by record_checkpoint (allocopt.runtime.load_model)
# Config keys that say how a model is run or where it came from, not what it computes.
_RUNTIME_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                           "output_attentions", "output_hidden_states", "return_dict", "output_router_logits",
                           "torchscript", "chunk_size_feed_forward", "tie_encoder_decoder", "auto_map"})
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.complex64: "C64"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                     ("uint64", "U64"), ("float8_e8m0fnu", "F8_E8M0")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code

# tensor name -> (safetensors dtype, shape, sha256 hex of the bytes)
Digests = dict[str, tuple[str, tuple[int, ...], str]]


# ---- the fingerprint --------------------------------------------------------------------------------------

# A model's fingerprint is computed once while its tensors stay the same objects, unchanged in place, and its
# config says the same.
_MEMO: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, str]]" = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module, structure: Mapping[str, Any]) -> str:
    """The model's identity (see the module doc); ``structure`` is what discovery saw (class, layers, experts)."""
    snapshot = _snapshot(model)
    essentials = json.dumps({"scheme": SCHEME, **structure, "config": config_essentials(model.config),
                             "dtypes": sorted({str(t.dtype).removeprefix("torch.") for _, t in snapshot_items(model)
                                               if t.is_floating_point()})}, sort_keys=True, default=str)
    memo = _MEMO.get(model)
    if memo is not None and memo[0] == (snapshot, essentials):
        return memo[1]
    digests = _checkpoint_digests(model, snapshot)
    if digests is None:
        digests = memory_digests(model)
    h = hashlib.sha256(essentials.encode())
    for name in sorted(digests):
        dtype, shape, digest = digests[name]
        h.update(f"\n{name}\t{dtype}\t{list(shape)}\t{digest}".encode())
    out = h.hexdigest()
    _MEMO[model] = ((snapshot, essentials), out)
    return out



def config_essentials(config: Any) -> Any:
    """The config as a JSON-able dict without the keys that do not change what the model computes."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()
                    if not str(k).startswith("_") and str(k) not in _RUNTIME_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

    return clean(raw)


def snapshot_items(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (what a checkpoint holds; non-persistent buffers such as RoPE's
    ``inv_freq`` follow from the config and may be rebuilt while the model runs)."""
    yield from model.named_parameters(remove_duplicate=False)
    for prefix, module in model.named_modules(remove_duplicate=False):
        skip = getattr(module, "_non_persistent_buffers_set", ())
        for name, t in module.named_buffers(recurse=False):
            if name not in skip:
                yield (f"{prefix}.{name}" if prefix else name), t


def _snapshot(model: nn.Module) -> tuple:
    """Which tensors the model holds and whether any changed in place: (name, object, version, dtype, shape) each;
    a tensor on the meta device (offloaded) counts by name, dtype and shape only (accelerate swaps its object)."""
    out = []
    for name, t in snapshot_items(model):
        meta = t.device.type == "meta"
        try:
            version = None if meta else t._version
        except RuntimeError:                      # an inference-mode tensor has no version counter
            version = -1
        out.append((name, None if meta else id(t), version, str(t.dtype), tuple(t.shape)))
    return tuple(out)


# ---- a model loaded from a checkpoint directory -----------------------------------------------------------

@dataclass(frozen=True)
class CheckpointRecord:
    directory: Path
    files: tuple[tuple[Path, tuple[int, ...]], ...]   # each weight file and its stat key at load time
    snapshot: tuple                                     # the model's tensors when loading finished


def record_checkpoint(model: nn.Module, directory: str | os.PathLike) -> None:
    """Say that ``model`` was just loaded from the safetensors files of ``directory`` (``load_model`` calls it), so
    its fingerprint is read from those files (cached) for as long as they and the model's tensors stay unchanged."""
    directory = Path(directory).resolve()
    files = tuple((f, key) for f in weight_files(directory) if (key := _stat_key(f)) is not None)
    if files:
        model.__dict__[_ATTR] = CheckpointRecord(directory, files, _snapshot(model))


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers reads (``checkpoint_files.weight_shards``), else every one there."""
    try:
        _, shards = weight_shards(directory)
    except ValueError:
        shards = {}
    return [directory / name for name in sorted(shards)] or sorted(directory.glob("*.safetensors"))


def _stat_key(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _checkpoint_digests(model: nn.Module, snapshot: tuple) -> Digests | None:
    """The checkpoint's per-tensor digests, or None where they do not describe the model in memory any more."""
    record = model.__dict__.get(_ATTR)
    if not isinstance(record, CheckpointRecord):
        return None
    if not _unchanged(record.snapshot, snapshot):
        log.debug("the model's tensors changed since it was loaded from %s; hashing them in memory", record.directory)
        return None
    if any(_stat_key(f) != key for f, key in record.files):
        log.debug("the checkpoint files in %s changed since the model was loaded; hashing it in memory", record.directory)
        return None
    return checkpoint_digests(record.directory, [f for f, _ in record.files])


def _unchanged(before: tuple, now: tuple) -> bool:
    if len(before) != len(now):
        return False
    for (name, obj, version, dtype, shape), (name2, obj2, version2, dtype2, shape2) in zip(before, now):
        if (name, dtype, shape) != (name2, dtype2, shape2):
            return False
        if obj is not None and obj2 is not None and (obj, version) != (obj2, version2):
            return False
    return True


def checkpoint_digests(directory: Path, files: list[Path]) -> Digests:
    """Per-tensor digests of ``files`` (safetensors), from the cache where a file's stat key still matches."""
    directory = Path(directory).resolve()
    cache_path = _cache_path(directory)
    cached = _read_cache(cache_path)
    out: Digests = {}
    entries: dict[str, Any] = {}
    cold: list[tuple[Path, tuple[int, ...] | None]] = []
    for f in files:
        f = f.resolve()
        key = _stat_key(f)
        entry = cached.get(str(f))
        if key is not None and isinstance(entry, dict) and entry.get("key") == list(key):
            entries[str(f)] = entry
        else:
            cold.append((f, key))
    if cached and not cold:
        with contextlib.suppress(OSError):
            os.utime(cache_path)                              # used now: trimmed last
    if cold:
        workers = max(1, min(len(cold), os.cpu_count() or 1, defaults.DIGEST_THREADS))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda fk: file_digests(fk[0]), cold))
        for (f, key), tensors in zip(cold, results):
            if key is not None and _stat_key(f) == key:      # unchanged while it was read: worth keeping
                entries[str(f)] = {"key": list(key), "tensors": {n: [d, list(s), h] for n, (d, s, h) in tensors.items()}}
            else:
                entries[str(f)] = {"key": None, "tensors": {n: [d, list(s), h] for n, (d, s, h) in tensors.items()}}
        _write_cache(cache_path, directory, {k: v for k, v in entries.items() if v["key"] is not None})
    for f in files:
        for name, (dtype, shape, digest) in entries[str(f.resolve())]["tensors"].items():
            out[name] = (dtype, tuple(shape), digest)
    return out


def file_digests(path: Path) -> Digests:
    """sha256 of every tensor's bytes in one safetensors file, reading it once in chunks of DIGEST_CHUNK_BYTES."""
    try:
        with open(path, "rb", buffering=0) as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k) for k, v in header.items())
            hashers = {k: hashlib.sha256() for _, _, k in spans}
            buf = bytearray(defaults.DIGEST_CHUNK_BYTES)
            view = memoryview(buf)
            pos, i = 0, 0                                    # bytes of the data region read; first unfinished span
            end_all = max((e for _, e, _ in spans), default=0)
            while pos < end_all:
                got = fh.readinto(view)
                if not got:
                    raise ValueError(f"it ends at byte {8 + size + pos}, before its last tensor")
                lo, hi = pos, pos + got
                while i < len(spans) and spans[i][1] <= lo:
                    i += 1
                j = i
                while j < len(spans) and spans[j][0] < hi:
                    begin, end, name = spans[j]
                    a, b = max(begin, lo), min(end, hi)
                    if a < b:
                        hashers[name].update(view[a - lo:b - lo])
                    j += 1
                pos = hi
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise AllocoptError(f"cannot read the weights file {path} to fingerprint the model ({exc}); "
                            "pass an intact safetensors checkpoint") from exc
    return {k: (v["dtype"], tuple(int(s) for s in v["shape"]), hashers[k].hexdigest()) for k, v in header.items()}


# ---- the digest cache ----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where allocopt keeps per-machine caches: $ALLOCOPT_CACHE_DIR, else $XDG_CACHE_HOME/allocopt, else ~/.cache/allocopt."""
    explicit = os.environ.get(defaults.CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "allocopt"


def _cache_path(directory: Path) -> Path:
    return cache_dir() / defaults.DIGEST_CACHE_SUBDIR / (hashlib.sha256(str(directory).encode()).hexdigest()[:32] + ".json")


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = obj.get("files") if isinstance(obj, dict) and obj.get("format") == defaults.DIGEST_CACHE_FORMAT else None
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, directory: Path, files: dict[str, Any]) -> None:
    from allocopt.io import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"format": defaults.DIGEST_CACHE_FORMAT, "directory": str(directory),
                                            "files": files}, separators=(",", ":")))
    except (AllocoptError, OSError) as exc:
        log.debug("could not write the digest cache %s (%s); the next command reads the weights again", path, exc)
        return
    _trim(path.parent)


def _trim(folder: Path) -> None:
    """Keep the DIGEST_CACHE_MAX_FILES checkpoints used last (a cache file's mtime is its last use)."""
    try:
        entries = sorted(((f.stat().st_mtime_ns, f) for f in folder.glob("*.json")), reverse=True)
        for _, f in entries[defaults.DIGEST_CACHE_MAX_FILES:]:
            f.unlink(missing_ok=True)
    except OSError:
        pass


# ---- a model in memory ------------------------------------------------------------------------------------

def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: the state dict less tied copies and keys ignored on save, with
    transformers' load-time weight conversions (fused experts, renamings) reverted to the checkpoint layout."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import remove_tied_weights_from_state_dict, revert_weight_conversion
    except ImportError:                                    # another transformers: the state dict as it is
        return state
    if isinstance(model, PreTrainedModel):
        state = remove_tied_weights_from_state_dict(state, model)
        if not any(t.device.type == "meta" for t in state.values()):
            try:
                state = revert_weight_conversion(model, state)
            except Exception as exc:                       # noqa: BLE001 - a layout transformers cannot revert
                log.debug("kept %s's in-memory tensor layout for its fingerprint (%s)", type(model).__name__, exc)
    return state


def memory_digests(model: nn.Module) -> Digests:
    """Per-tensor digests of the model's own tensors, in the checkpoint layout (:func:`checkpoint_state`)."""
    state = checkpoint_state(model)
    meta = sorted(n for n, t in state.items() if t.device.type == "meta")
    if meta:
        raise AllocoptError(f"cannot fingerprint {type(model).__name__}: {len(meta)} of its tensors (e.g. {meta[0]}) are "
                            "on the meta device and it was not loaded from a checkpoint by allocopt (or changed "
                            "since); load it with allocopt.runtime.load_model, or fully into memory")
    out: Digests = {}
    with torch.no_grad():
        for name, t in state.items():
            t = t.detach().to("cpu").contiguous()
            h = hashlib.sha256()
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())       # the stored bytes, no copy
            digest = h.hexdigest()
            out[name] = (_ST_DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch.")), tuple(t.shape), digest)
    return out


__all__ = ["SCHEME", "CheckpointRecord", "cache_dir", "checkpoint_digests", "checkpoint_state", "config_essentials",
           "file_digests", "fingerprint", "memory_digests", "record_checkpoint", "weight_files"]
