"""A model's context length, and the check every command that feeds it rows of ``--seq-len`` tokens makes first.

Positions past the context a model was trained for give outputs nobody validated (learned position tables end
there; RoPE models extrapolate badly), so statistics and ESAP measured there are silently off. The check reads
only the checkpoint's config, before any weights load; ``allow_long_context`` (``--allow-long-context``) runs anyway.

    check_context("testbed", 2048, what="--seq-len")      # AllocoptError: ... context is 1024 tokens ...
"""
from __future__ import annotations

from typing import Any

from allocopt.errors import AllocoptError

# Config fields that hold the context length, by the name each model family gives it (first found wins).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx", "max_seq_len")


def context_length(config: Any) -> tuple[int, str] | None:
    """``(tokens, field name)`` of a transformers config (its text config for multimodal ones), or None if unknown."""
    for cfg in (config, getattr(config, "text_config", None)):
        for name in CONTEXT_FIELDS:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, name
    return None


def check_context(model: Any, seq_len: int, what: str = "--seq-len", allow: bool = False,
                  trust_remote_code: bool = False, settable: bool = True, force: str = "--allow-long-context") -> None:
    """Refuse ``seq_len`` tokens per row beyond the context of ``model`` (a checkpoint dir, ``testbed`` or a
    ``ModelSource`` whose config was read already).

    ``what`` names the length and ``force`` the override in the message; ``settable=False`` when the user cannot
    choose the length (eval's windows).
    """
    if allow:
        return
    from allocopt.runtime.loading import open_model

    source = open_model(model, trust_remote_code)
    model = source.spec
    found = context_length(source.config)
    if found is None or seq_len <= found[0]:
        return
    context, field = found
    shorten = f"use {what} {context} or less, or " if settable else ""
    raise AllocoptError(f"{what} {seq_len} is longer than the context of model {model} ({context} tokens, config.{field}); "
                        f"{shorten}pass {force} to run past it anyway")
