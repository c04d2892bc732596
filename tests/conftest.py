"""Shared fixtures: tiny random MoE models of every supported family (no downloads)."""
from __future__ import annotations

from typing import Callable

import pytest
from torch import nn

from allocopt.models.tiny import build_tiny_model

# The families the component tests below run on (the full family matrix is tests/test_families.py).
FAMILIES = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "glm4_moe")

__all__ = ["FAMILIES", "tiny_model"]


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
