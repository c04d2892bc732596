"""Load a model by spec: a local checkpoint directory or the word ``testbed``. Safetensors only, no hub.

Every command loads through :func:`load_model` with one :class:`LoadOptions` (``--device``, ``--dtype``,
``--device-map``, ``--max-memory``, ``--offload-dir``, ``--trust-remote-code``; the same keys in problem files).
A device map hands placement to accelerate (transformers' ``device_map``/``max_memory``/``offload_folder``): layers
spread over GPUs, the CPU and disk, so a model larger than one device, or than host RAM, still loads.

    model, tokenizer = load_model("./OLMoE-1B-7B", LoadOptions(max_memory={"cpu": "600MiB"}, offload_dir="/tmp/off"))
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers
from torch import nn

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.models.export import LAYER_COUNTS_FIELD, load_pruned, strict_from_pretrained
from allocopt.models.offload import install_direct_reads, reserve_streamed_layer

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
            out["offload_folder"] = str(self.offload_dir)
        return out

    def with_(self, **changes: Any) -> "LoadOptions":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_max_memory(limits: Mapping[str, str]) -> dict[int | str, str]:
    """``{"cuda:0": "70GiB", "cpu": "200GiB"}`` -> accelerate's ``{0: "70GiB", "cpu": "200GiB"}``, checked."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, str] = {}
    for device, size in limits.items():
        key: int | str = device.strip().lower()
        if key in ("cuda", "gpu"):
            key = 0
        elif isinstance(key, str) and (key.startswith("cuda:") or key.isdigit()):
            try:
                key = int(key.removeprefix("cuda:"))
            except ValueError:
                key = device
        if isinstance(key, str) and key not in ("cpu", "mps", "xpu", "disk"):
            raise AllocoptError(f"--max-memory device {device!r} is not a device; use cuda:N, cpu (e.g. --max-memory cpu=600MiB)")
        try:
            convert_file_size_to_int(str(size))
        except ValueError as exc:
            raise AllocoptError(f"--max-memory size {size!r} for {device} is not a size; write e.g. 70GiB or 600MiB") from exc
        out[key] = str(size)
    return out
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def resolve(spec: str | Path) -> Path:
    """The checkpoint directory a model spec names, checked to hold a config.json."""
    if str(spec) == "testbed":
        from allocopt import testbed  # lazy: the testbed package is heavy and optional for other models

        path = Path(testbed.path())
    else:
        path = Path(spec).expanduser()
    if not path.exists() and str(spec) == "testbed":
        raise AllocoptError(f"the testbed checkpoint {path} is missing; reinstall allocopt or pass --model PATH")
    if not path.exists():
        raise AllocoptError(f"model path {path} does not exist; pass a local checkpoint directory or `testbed` (no hub downloads)")
    if not path.is_dir():
        raise AllocoptError(f"model path {path} is a file, not a directory; pass the checkpoint directory that holds config.json")
    if not (path / "config.json").is_file():
        raise AllocoptError(f"model directory {path} has no config.json; pass a transformers checkpoint directory")
    return path


def load_config(path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's transformers config, refused early when allocopt could not load it as a causal LM.

    A model type transformers does not know is refused unless the user asked for ``trust_remote_code`` and the
    config's ``auto_map`` names the checkpoint's own code (checked here, so transformers never prompts for it).
    Without ``trust_remote_code`` a known type is built from its stock transformers class, whatever ``auto_map`` says.
    """
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AllocoptError(f"{path}/config.json is not readable JSON ({exc}); pass an intact transformers checkpoint") from exc
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
    """The checkpoint loaded strictly (``export.strict_from_pretrained``) with the auto class, else the family's own
    class for types the causal-LM auto mapping leaves out (mistral4)."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping and \
            getattr(config, "model_type", None) in _catalog_types():
        load = _catalog_class(config).from_pretrained
    return strict_from_pretrained(load, path, config, **kwargs)


def load_model(spec: str | Path, options: LoadOptions | None = None, *, dtype: torch.dtype | str | None = None,
               device: str | None = None, trust_remote_code: bool | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode; pruned allocopt exports go through ``load_pruned`` automatically.

    ``options`` (or the shortcuts ``dtype``/``device``/``trust_remote_code``) say where and how: one device, or a
    device map over GPUs, CPU and disk. ``tokenizer`` is None when the directory has none.
    """
    options = (options or LoadOptions()).with_(dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    path = resolve(spec)
    config = load_config(path, options.trust_remote_code)
    check_safetensors(path)
    placement = options.from_pretrained_kwargs()
    if "max_memory" in placement and not options.trust_remote_code:    # the limit holds the streamed layer too
        placement["max_memory"] = reserve_streamed_layer(placement["max_memory"], _skeleton(config),
                                                         _dtype(options.dtype, config))
    if getattr(config, LAYER_COUNTS_FIELD, None) is not None:
        model = load_pruned(path, dtype=options.dtype, device=options.resolved_device(), **placement)
    else:
        model = _from_pretrained(path, config, dtype=options.dtype, trust_remote_code=options.trust_remote_code, **placement)
        model = model.eval() if placement else model.to(options.resolved_device()).eval()
    if placement:
        install_direct_reads(model)               # offloaded weights come back with one copy, no file mapping
    use_fast_experts(model, options.resolved_device())
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    return model, tokenizer

