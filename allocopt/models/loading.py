"""Load a model by spec: a local checkpoint directory or the word ``testbed``. Safetensors only, no hub."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.models.export import LAYER_COUNTS_FIELD, load_pruned, strict_from_pretrained

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
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


def _from_pretrained(path: Path, config: Any, **kwargs: Any) -> nn.Module:
    """The checkpoint loaded strictly (``export.strict_from_pretrained``) with the auto class, else the family's own
    class for types the causal-LM auto mapping leaves out (mistral4)."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping and \
            getattr(config, "model_type", None) in _catalog_types():
        load = _catalog_class(config).from_pretrained
    return strict_from_pretrained(load, path, config, **kwargs)


def load_model(spec: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
               trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode; pruned allocopt exports go through ``load_pruned`` automatically.

    ``dtype=None`` keeps the checkpoint's own dtype. ``tokenizer`` is None when the directory has none.
    """
    path = resolve(spec)
    config = load_config(path, trust_remote_code)
    check_safetensors(path)
    if getattr(config, LAYER_COUNTS_FIELD, None) is not None:
        model = load_pruned(path, dtype=dtype, device=device)
    else:
        model = _from_pretrained(path, config, dtype=dtype, trust_remote_code=trust_remote_code)
        model = model.to(device).eval()
    use_fast_experts(model, device)
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer
