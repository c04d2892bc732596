"""Shared fixtures: tiny random MoE models of every supported family (no downloads)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Callable

import pytest
from torch import nn

from allocopt.testing.tiny import build_tiny_model

# One scratch directory per test session, removed when its process exits, set before any test module copies the
# environment for its subprocesses: checkpoint digests (allocopt.models.identity) go there rather than to the user's
# ~/.cache, and so do the IPC sockets vLLM opens (by default in /tmp, where a killed engine leaves them).
_SCRATCH = tempfile.mkdtemp(prefix="allocopt-test-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ.setdefault("ALLOCOPT_CACHE_DIR", os.path.join(_SCRATCH, "cache"))
os.environ.setdefault("VLLM_RPC_BASE_PATH", os.path.join(_SCRATCH, "vllm-rpc"))
os.makedirs(os.environ["VLLM_RPC_BASE_PATH"], exist_ok=True)

# The families the component tests below run on (the full family matrix is tests/test_families.py).
FAMILIES = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "glm4_moe")

__all__ = ["FAMILIES", "tiny_model"]

# The dependencies whose releases change what allocopt computes; their versions close every test run (CI's log
# records what a fresh install resolved; pyproject.toml states the supported ranges).
REPORTED_VERSIONS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "optuna", "sqlalchemy", "pymoo",
                     "numpy", "scipy", "lm-eval", "compressed-tensors", "python")


def dependency_versions() -> dict[str, str]:
    import importlib.metadata as metadata
    import platform

    out = {}
    for name in REPORTED_VERSIONS:
        try:
            out[name] = platform.python_version() if name == "python" else metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line("versions: " + ", ".join(f"{k} {v}" for k, v in dependency_versions().items()))


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: ``tiny_model("deepseek_v3", seed=1)`` -> a fresh 3-layer, 8-expert, top-2 model (eval, fp32)."""
    return build_tiny_model


def random_kept(info, counts=(3, 6, 4), seed: int = 0) -> dict[int, list[int]]:
    """A random plan for ``describe(model)`` that its routers can route: counts raised to each layer's floor and,
    under group-limited routing, rounded to equal groups (each group keeps random experts of its own)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    kept = {}
    for layer, count in zip(info.layers, counts):
        c = max(count, layer.min_kept)
        if layer.groups > 1:
            size, per = layer.num_experts // layer.groups, -(-c // layer.groups)
            kept[layer.index] = sorted(grp * size + int(e) for grp in range(layer.groups)
                                       for e in torch.randperm(size, generator=g)[:per])
        else:
            kept[layer.index] = sorted(torch.randperm(layer.num_experts, generator=g)[:c].tolist())
    return kept


# ---- lm-evaluation-harness, offline, on two tiny local tasks (tests/lm_eval_kit.py) ----------------------------

@pytest.fixture(scope="module")
def lm_eval_offline():
    from lm_eval_kit import offline_lm_eval

    with offline_lm_eval():
        yield


@pytest.fixture(scope="module")
def items() -> list[dict]:
    """The first ``lm_eval_kit.ITEMS`` testbed math MC items, the tiny tasks' data."""
    from allocopt.evaluation import tasks
    from lm_eval_kit import ITEMS

    return tasks.mc_items("math")[:ITEMS]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, items):
    """A folder holding the tiny lm-eval tasks (MC and log-likelihood) on ``items``."""
    from lm_eval_kit import write_tasks

    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), items)
