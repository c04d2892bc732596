"""Shared fixtures: tiny random MoE models of every supported family (no downloads)."""
from __future__ import annotations

from typing import Callable

import pytest
from torch import nn

from allocopt.models.tiny import FAMILIES, build_tiny_model

__all__ = ["FAMILIES", "tiny_model"]


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: ``tiny_model("deepseek_v3", seed=1)`` -> a fresh 3-layer, 8-expert, top-2 model (eval, fp32)."""
    return build_tiny_model
