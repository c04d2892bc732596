"""Load a model by spec: a local checkpoint directory or the word ``testbed``. Safetensors only, no hub.

Every command loads through :func:`load_model` with one :class:`LoadOptions` (``--device``, ``--dtype``,
``--device-map``, ``--max-memory``, ``--offload-dir``, ``--trust-remote-code``; the same keys in problem files).
A device map hands placement to accelerate (transformers' ``device_map``/``max_memory``/``offload_folder``): layers
spread over GPUs, the CPU and disk, so a model larger than one device, or than host RAM, still loads.

    model, tokenizer = load_model("./OLMoE-1B-7B", LoadOptions(max_memory={"cpu": "600MiB"}, offload_dir="/tmp/off"))
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import transformers
from torch import nn

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.models.checkpoint_files import INDEX_FILE, weight_shards
from allocopt.models.identity import record_checkpoint
from allocopt.models.pruned import DAMAGED, LAYER_COUNTS_FIELD, load_pruned, strict_from_pretrained
from allocopt.runtime.converted import Converted, converted_checkpoint
from allocopt.runtime.offload import install_direct_reads, read_header, reserve_streamed_layer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded, the same for every command. Sizes are accelerate's ("70GiB", "600MiB")."""

    device: str = defaults.DEVICE                    # "auto": CUDA when present, else CPU (ignored under a device map)
    dtype: str | None = None                         # None: the checkpoint's own dtype
    device_map: str | None = defaults.DEVICE_MAP     # "auto": accelerate places layers on GPUs, CPU and disk
    max_memory: Mapping[str, str] = field(default_factory=dict)   # {"cuda:0": "70GiB", "cpu": "200GiB"}
    offload_dir: str | None = None                   # where weights beyond max_memory go (disk offload)
    trust_remote_code: bool = False

    @property
    def dispatched(self) -> bool:
        """A device map is in use (asked for, or implied by a memory limit or an offload folder)."""
        return self.device_map is not None or bool(self.max_memory) or self.offload_dir is not None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keywords for placement (empty when the model goes to one device afterwards)."""
        if not self.dispatched:
            return {}
        out: dict[str, Any] = {"device_map": self.device_map or "auto"}
        if self.max_memory:
            out["max_memory"] = parse_max_memory(self.max_memory)
        if self.offload_dir is not None:
            out["offload_folder"] = str(Path(self.offload_dir).expanduser())
        return out

    def with_(self, **changes: Any) -> "LoadOptions":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_max_memory(limits: Mapping[str, str]) -> dict[int | str, str]:
    """``{"cuda:0": "70GiB", "cpu": "200GiB"}`` -> accelerate's ``{0: "70GiB", "cpu": "200GiB"}``, checked against this
    machine: every device exists here (CUDA or XPU devices by index, mps when available, cpu) and every size is a size
    above zero. ``disk`` is refused: what does not fit the other limits goes to --offload-dir, with no limit of its own."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, str] = {}
    named: dict[int | str, str] = {}
    for device, size in limits.items():
        shown, name = f"--max-memory {device}={size}", str(device).strip().lower()
        if name == "disk":
            raise AllocoptError(f"{shown}: the disk takes no limit in allocopt (weights that do not fit the other limits "
                                "go to --offload-dir, however many there are); leave out disk=SIZE and pass --offload-dir DIR")
        kind, _, index = name.partition(":")
        if name.isdigit() or (kind in ("cuda", "gpu", "xpu") and (index.isdigit() or not index)):
            key: int | str = int(name) if name.isdigit() else int(index or 0)
            kind = "xpu" if kind == "xpu" or (name.isdigit() and not torch.cuda.is_available() and _count("xpu")) else "cuda"
            _check_device_exists(shown, kind, key, f"leave out {device}=SIZE or limit a device this machine has, "
                                                   "e.g. --max-memory cpu=600MiB")
        elif name in ("cpu", "mps") and not index:
            key = name
            _check_device_exists(shown, name, None, f"leave out {device}=SIZE or use --max-memory cpu=SIZE")
        else:
            raise AllocoptError(f"{shown}: {device!r} is not a device; use cuda:N, xpu:N, mps or cpu "
                                "(e.g. --max-memory cuda:0=70GiB --max-memory cpu=200GiB)")
        try:
            nbytes = convert_file_size_to_int(str(size).strip())
        except ValueError as exc:
            raise AllocoptError(f"{shown}: {size!r} is not a size; write e.g. {device}=70GiB or {device}=600MiB") from exc
        if nbytes <= 0:
            raise AllocoptError(f"{shown} gives that device no memory; give a size above zero (e.g. {device}=600MiB) "
                                "or leave the limit out")
        if key in named:
            raise AllocoptError(f"{shown}: {named[key]} and {device} name the same device; give each device one limit")
        named[key] = str(device)
        out[key] = str(size).strip()
    return out


def _count(kind: str) -> int:
    """How many devices of torch device type ``kind`` this machine has (cpu: 1; mps: 1 when available)."""
    if kind == "cpu":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    module = getattr(torch, kind, None)
    try:
        return int(module.device_count()) if module is not None and module.is_available() else 0
    except (AttributeError, RuntimeError):
        return 0


def _check_device_exists(shown: str, kind: str, index: int | None, fix: str) -> None:
    count = _count(kind)
    if count == 0:
        raise AllocoptError(f"{shown}: this machine has no {kind} device (torch sees none); {fix}")
    if index is not None and index >= count:
        have = ", ".join(f"{kind}:{i}" for i in range(count))
        raise AllocoptError(f"{shown}: this machine has {count} {kind} device{'s' if count > 1 else ''} ({have}); {fix}")


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(options: "LoadOptions") -> None:
    """Refuse, before anything loads, a placement this machine cannot give: a --device or a --max-memory device it
    does not have, a size that is not one or is zero, an unknown --device-map. Creates nothing (the offload folder
    is made and tried when the load starts: :func:`_offload_dir`)."""
    if options.device != "auto":
        shown = f"--device {options.device}"
        try:
            device = torch.device(str(options.device).strip())
        except (RuntimeError, ValueError, TypeError) as exc:
            raise AllocoptError(f"{shown} is not a torch device; use auto, cpu, cuda, cuda:N, mps or xpu") from exc
        if device.type == "meta":
            raise AllocoptError(f"{shown} holds no weights; use auto, cpu, cuda, cuda:N, mps or xpu")
        _check_device_exists(shown, device.type, device.index, "use --device auto (CUDA when present, else CPU) or cpu")
    if options.device_map is not None and options.device_map not in _DEVICE_MAPS:
        raise AllocoptError(f"--device-map {options.device_map} is not a placement accelerate knows; use --device-map auto, "
                            "or leave it out and pick one device with --device")
    if options.max_memory:
        parse_max_memory(options.max_memory)


@contextlib.contextmanager
def _offload_dir(directory: str | None) -> Iterator[None]:
    """The --offload-dir created if needed and tried with a real write (a temporary file, written, synced, removed)
    before the load starts; if the load then fails, what this run created goes again (the folder itself when it made
    it, else the files it added), so a refused run leaves nothing half-written."""
    if directory is None:
        yield
        return
    path = Path(directory).expanduser()
    fix = "pass --offload-dir DIR naming a folder you can write to, with room for the weights beyond --max-memory"
    new: list[Path] = []                                               # the folders this run makes, innermost first
    before: set[str] = set()                                           # what a folder that was there already held

    def undo() -> None:
        if new:
            shutil.rmtree(new[-1], ignore_errors=True)
        elif path.is_dir():
            for p in path.iterdir():
                if p.name in before:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    try:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise AllocoptError(f"--offload-dir {directory} cannot be created: {blocker} is a file, not a folder; {fix}")
        new = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in path.iterdir()}
        fd, probe = tempfile.mkstemp(prefix=".allocopt-offload-", suffix=".tmp", dir=path)
        try:
            with os.fdopen(fd, "wb") as fh:                 # a full disk or a quota refuses the write, not the open
                fh.write(bytes(4096))
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            os.unlink(probe)
    except OSError as exc:
        undo()
        raise AllocoptError(f"--offload-dir {directory} cannot hold files ({exc.strerror or exc}); {fix}") from exc
    try:
        yield
    except BaseException:
        undo()
        raise


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _shipped_models() -> dict[str, Any]:
    """``--model`` names of the shipped testbeds -> their checkpoint directory (imported lazily: heavy, optional)."""
    def first() -> Path:
        from allocopt import testbed

        return Path(testbed.path())

    def deep() -> Path:
        from allocopt.testbed import deep

        return deep.path()

    return {"testbed": first, "testbed-deep": deep}


def resolve(spec: str | Path, what: str = "model", fix: str | None = None) -> Path:
    """The checkpoint directory a model spec names, checked to hold a config.json. Errors call it ``what`` (the
    option that gave it, e.g. ``--pruned``) and advise ``fix`` instead of the defaults for a ``--model``."""
    shipped = _shipped_models()
    path = shipped[str(spec)]() if str(spec) in shipped else Path(spec).expanduser()
    if not path.exists() and str(spec) in shipped:
        raise AllocoptError(f"the {spec} checkpoint {path} is missing; reinstall allocopt or pass --model PATH")
    if not path.exists():
        raise AllocoptError(f"{what} path {path} does not exist; " + (fix or "pass a local checkpoint directory or "
                            f"one of {', '.join(sorted(shipped))} (no hub downloads)"))
    if not path.is_dir():
        raise AllocoptError(f"{what} path {path} is a file, not a directory; "
                            + (fix or "pass the checkpoint directory that holds config.json"))
    if not (path / "config.json").is_file():
        raise AllocoptError(f"{what} directory {path} has no config.json; "
                            + (fix or "pass a transformers checkpoint directory"))
    return path


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint located (:func:`resolve`) and its config.json read once (:func:`load_config`): what the checks
    before loading (context length, budget on a meta skeleton) and :func:`load_model` itself share."""

    spec: str
    path: Path
    config: Any                                      # the transformers config
    trust_remote_code: bool = False

    @property
    def is_pruned_export(self) -> bool:
        """An allocopt export with per-layer expert counts (loaded through ``load_pruned``)."""
        return getattr(self.config, LAYER_COUNTS_FIELD, None) is not None


def open_model(spec: "str | Path | ModelSource", trust_remote_code: bool = False) -> ModelSource:
    """The :class:`ModelSource` of a model spec (a checkpoint directory or ``testbed``); a source passes through."""
    if isinstance(spec, ModelSource) and spec.trust_remote_code == trust_remote_code:
        return spec
    spec = spec.spec if isinstance(spec, ModelSource) else str(spec)
    path = resolve(spec)
    return ModelSource(spec, path, load_config(path, trust_remote_code), trust_remote_code)


def load_config(path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's transformers config, refused early when allocopt could not load it as a causal LM.

    A model type transformers does not know is refused unless the user asked for ``trust_remote_code`` and the
    config's ``auto_map`` names the checkpoint's own code (checked here, so transformers never prompts for it).
    Without ``trust_remote_code`` a known type is built from its stock transformers class, whatever ``auto_map`` says.
    """
    try:                         # transformers' own reader: it also decodes the floats JSON cannot hold (Infinity)
        raw, _ = transformers.PretrainedConfig.get_config_dict(str(path))
    except (OSError, ValueError) as exc:
        raise AllocoptError(f"{path}/config.json is not readable JSON ({exc}); pass an intact transformers checkpoint") from exc
    except (TypeError, AttributeError):                  # JSON, but not an object
        raw = {}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    raw = raw if isinstance(raw, dict) else {}
    model_type, remote = raw.get("model_type"), bool(raw.get("auto_map"))
    if model_type not in CONFIG_MAPPING_NAMES:
        if remote and not trust_remote_code:
            raise AllocoptError(f"model {path} needs its own Python code (auto_map in config.json, model_type {model_type!r}); "
                                "pass --trust-remote-code only if you trust that code")
        if not remote:
            raise AllocoptError(f"model {path} has model_type {model_type!r}, which transformers {transformers.__version__} "
                                "does not know; pass a supported MoE checkpoint (e.g. OLMoE, Qwen3-MoE, Mixtral)")
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in _catalog_types():
        raise AllocoptError(f"model {path} ({model_type}) is not a causal language model; allocopt needs a decoder-only MoE model")
    if model_type in CONFIG_MAPPING_NAMES and not (remote and trust_remote_code):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type].from_dict(raw)     # what AutoConfig builds, from the JSON read above
    return transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_safetensors(path: Path) -> None:
    """Weights are read from safetensors only: a pickle checkpoint could run arbitrary code when loaded."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for pattern in _PICKLE_WEIGHTS for f in path.glob(pattern))
    if pickles:
        raise AllocoptError(f"model {path} has only pickle weights ({', '.join(pickles)}); allocopt loads safetensors only, "
                            "convert the checkpoint with save_pretrained(..., safe_serialization=True) where you trust it")
    raise AllocoptError(f"model directory {path} has no weights (*.safetensors); pass a complete checkpoint directory")


def check_checkpoint_files(path: Path) -> None:
    """The safetensors files transformers will read (``model.safetensors``, else the shards that
    ``model.safetensors.index.json`` names), checked from their headers and sizes only, no tensor data: every shard the
    index names exists, every header reads, every file is as long as its header says (a cut-short copy is not), and
    every tensor the index places in a shard is in it. Each refusal names the file and says to copy the checkpoint
    again."""
    try:                                                  # transformers' order: the single file wins
        index, shards = weight_shards(path)
    except ValueError as exc:
        raise AllocoptError(f"checkpoint file {path / INDEX_FILE} is not a readable shard index ({exc}); {DAMAGED}") from exc
    for shard, tensors in shards.items():
        file = path / shard
        if not file.is_file():
            raise AllocoptError(f"checkpoint file {index} names shard {shard}, which does not exist; {DAMAGED}")
        try:
            start, header = read_header(str(file))
            end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise AllocoptError(f"checkpoint file {file} has no readable safetensors header ({exc}); {DAMAGED}") from exc
        size = file.stat().st_size
        if start + end != size:
            what = "a truncated copy" if size < start + end else "bytes its header does not describe"
            raise AllocoptError(f"checkpoint file {file} is {size} bytes but its header describes {start + end} ({what}); "
                                f"{DAMAGED}")
        absent = [t for t in tensors if t not in header]
        if absent:
            raise AllocoptError(f"checkpoint file {index} places tensor {absent[0]} in {shard}, which does not hold it"
                                f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; {DAMAGED}")


def use_fast_experts(model: nn.Module, device: str | torch.device) -> None:
    """Pick the fused-experts kernel that is fastest where the model runs (``defaults.EXPERTS_IMPLEMENTATION``).

    transformers 5 defaults to ``grouped_mm``, whose CPU path is several times slower than the per-expert
    ``eager`` loop (benchmarks/experts_kernel.py); results are identical, only the kernel changes.
    """
    choice = defaults.EXPERTS_IMPLEMENTATION.get(torch.device(device).type)
    setter = getattr(model, "set_experts_implementation", None)
    if choice is None or setter is None or getattr(model.config, "_experts_implementation", None) in (None, choice):
        return
    try:
        setter(choice)
    except (ValueError, RuntimeError):
        pass                                     # a model whose experts have no interface choice keeps its own


def instantiate(config: Any) -> nn.Module:
    """A causal LM built from ``config`` (random weights, or meta tensors under ``torch.device("meta")``): the auto
    class, which also unwraps a multimodal config's text model, else the family's own ``*ForCausalLM`` class for
    types transformers leaves out of its causal-LM auto mapping (mistral4)."""
    try:
        return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        return _catalog_class(config)(config)


def _catalog_types() -> dict[str, str]:
    from allocopt.models.catalog import moe_causal_lm_types

    return moe_causal_lm_types()


def _catalog_class(config: Any) -> type:
    from allocopt.models.catalog import moe_causal_lm_types

    name = moe_causal_lm_types().get(getattr(config, "model_type", None))
    if name is None:
        raise AllocoptError(f"transformers {transformers.__version__} has no causal-LM class for model_type "
                            f"{getattr(config, 'model_type', None)!r}; pass a decoder-only MoE checkpoint")
    return getattr(transformers, name)


def _skeleton(config: Any) -> nn.Module:
    with torch.device("meta"):
        return instantiate(config)


def _dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype | None:
    """The dtype weights will have once loaded: the one asked for, else the checkpoint's."""
    value = dtype if dtype not in (None, "auto") else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _from_pretrained(path: Path, config: Any, **kwargs: Any) -> nn.Module:
    """The checkpoint loaded strictly (``models.pruned.strict_from_pretrained``) with the auto class, else the family's own
    class for types the causal-LM auto mapping leaves out (mistral4)."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping and \
            getattr(config, "model_type", None) in _catalog_types():
        load = _catalog_class(config).from_pretrained
    return strict_from_pretrained(load, path, config, **kwargs)


def _weights_dir(path: Path, config: Any, options: LoadOptions, offload_folder: str | None) -> Converted:
    """Where the weights load from: ``path``, or under disk offload a copy in transformers' in-memory layout made a
    slice of experts at a time (``runtime.converted``), so its load-time conversion never holds a whole fused tensor.
    Quantized checkpoints and remote code convert through transformers as they are."""
    if offload_folder is None or options.trust_remote_code or getattr(config, "quantization_config", None):
        return Converted(path, None)
    return converted_checkpoint(path, _skeleton(config), Path(offload_folder))


def load_model(spec: str | Path | ModelSource, options: LoadOptions | None = None, *, dtype: torch.dtype | str | None = None,
               device: str | None = None, trust_remote_code: bool | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode; pruned allocopt exports go through ``load_pruned`` automatically.

    ``options`` (or the shortcuts ``dtype``/``device``/``trust_remote_code``) say where and how: one device, or a
    device map over GPUs, CPU and disk. ``tokenizer`` is None when the directory has none. A :class:`ModelSource`
    (from :func:`open_model`) is loaded without reading its config.json again.
    """
    options = (options or LoadOptions()).with_(dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    check_placement(options)                      # before anything loads: devices, sizes and device map of this machine
    source = open_model(spec, options.trust_remote_code)
    path, config = source.path, source.config
    check_safetensors(path)
    check_checkpoint_files(path)                  # headers and sizes only: a missing or cut-short shard fails here
    placement = options.from_pretrained_kwargs()
    if "max_memory" in placement and not options.trust_remote_code:    # the limit holds the streamed layer too
        placement["max_memory"] = reserve_streamed_layer(placement["max_memory"], _skeleton(config),
                                                         _dtype(options.dtype, config))
    with _offload_dir(placement.get("offload_folder")):
        weights, transforms = _weights_dir(path, config, options, placement.get("offload_folder"))
        if getattr(config, LAYER_COUNTS_FIELD, None) is not None:
            model = load_pruned(weights, dtype=options.dtype, device=options.resolved_device(), config=config, **placement)
        else:
            model = _from_pretrained(weights, config, dtype=options.dtype, trust_remote_code=options.trust_remote_code,
                                     **placement)
            model = model.eval() if placement else model.to(options.resolved_device()).eval()
        model.config._name_or_path = str(path)
        if transforms is not None:          # loaded already converted: saving reverses what the original load used
            model._weight_conversions = transforms
    if placement:
        install_direct_reads(model)               # offloaded weights come back with one copy, no file mapping
    use_fast_experts(model, options.resolved_device())
    if _dtype(options.dtype, config) == _dtype(None, config):   # not cast: the files hold exactly these weights
        record_checkpoint(model, path)            # so its fingerprint comes from them (cached digests)
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, config=config,      # config.json is read once
                                                               trust_remote_code=options.trust_remote_code)
    return model, tokenizer

