"""The embedded testbed: a small MoE trained by this project on an offline corpus, the default model everywhere.
Its corpus is the data source ``testbed:NAME`` (entry point ``allocopt.data_sources``: ``corpus.source``).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(allocopt.testbed.path())
"""
from __future__ import annotations

from pathlib import Path

from allocopt.testbed.corpus import DOMAINS, SPLITS, documents


def path() -> Path:
    """The shipped checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    return Path(__file__).resolve().parent / "checkpoint"


__all__ = ["DOMAINS", "SPLITS", "documents", "path"]
