"""The embedded testbed: a small MoE trained by this project on an offline corpus, the default model everywhere.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(allocopt.testbed.path())
"""
from __future__ import annotations

from pathlib import Path

from allocopt.data.tokens import register_source
from allocopt.testbed.corpus import DOMAINS, SPLITS, documents, source


def path() -> Path:
    """The shipped checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    return Path(__file__).resolve().parent / "checkpoint"


register_source("testbed", source)

__all__ = ["DOMAINS", "SPLITS", "documents", "path"]
