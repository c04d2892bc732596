"""Load a model by spec: a local checkpoint directory or the word ``testbed``. Safetensors only, no hub."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.models.export import LAYER_COUNTS_FIELD, load_pruned

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


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


def load_model(spec: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
               trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode; pruned allocopt exports go through ``load_pruned`` automatically.

    ``dtype=None`` keeps the checkpoint's own dtype. ``tokenizer`` is None when the directory has none.
    """
    path = resolve(spec)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(config, LAYER_COUNTS_FIELD, None) is not None:
        model = load_pruned(path, dtype=dtype, device=device)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto", use_safetensors=True,
                                                                  trust_remote_code=trust_remote_code)
        model = model.to(device).eval()
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer
