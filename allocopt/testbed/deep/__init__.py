"""The deep testbed (``--model testbed-deep``): a MoE in the regime real models live in, 12 MoE layers of 64
fine-grained routed experts (top-8) and a shared expert, Qwen2-MoE classes; trained by this project from a seed on
its own offline corpus (data source ``deep:NAME``). The first testbed stays the default for the quick start."""
from __future__ import annotations

from pathlib import Path

NAME = "testbed-deep"


def path() -> Path:
    """The shipped checkpoint directory (config.json, model.safetensors, tokenizer files, train_log.json)."""
    return Path(__file__).resolve().parent / "checkpoint"


__all__ = ["NAME", "path"]
