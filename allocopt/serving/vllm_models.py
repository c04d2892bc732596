"""vLLM model classes whose MoE layers each take their own expert count (imported by vLLM, never by allocopt itself).

``OlmoeForCausalLM`` here is vLLM's own ``OlmoeForCausalLM`` (and so on for every architecture in
``models.engines.VLLM_ARCHITECTURES``), except that while decoder layer ``i`` is built, the config's expert-count field
(the family table's ``count_field``) holds ``layer_num_experts[i]``. vLLM's stock layers
then size their router and fused experts per layer; the weight mapping keeps the config's largest count, which covers
every layer's expert ids. Weights load through the stock ``load_weights``, so vLLM's own checks still refuse a
missing or mis-shaped weight.

Classes are made on first access (module ``__getattr__``), because vLLM imports them by ``module:Class`` path.
"""
from __future__ import annotations

import contextlib
import importlib
import re
from typing import Any, Callable, Iterator

from torch import nn

from allocopt.models.engines import VLLM_ARCHITECTURES
from allocopt.models.surgery import LAYER_COUNTS_FIELD
_LAYER_INDEX = re.compile(r"\.(\d+)$")


def _count_field(config: Any) -> str:
    from allocopt.models.families import family_for

    field = family_for(getattr(config, "model_type", "")).count_field
    if not field or "." in field:
        raise ValueError(f"allocopt's vLLM plugin cannot set a per-layer expert count for model_type "
                         f"{getattr(config, 'model_type', None)!r}; serve the padded or unpruned checkpoint instead")
    return field


@contextlib.contextmanager
def _per_layer_construction(module: Any, model_config: Any, counts: list[int | None]) -> Iterator[None]:
    """While ``module`` builds its decoder layers (``make_layers``), layer ``i`` sees its own expert count.

    The count is set on the config object itself for the duration of that layer's constructor and restored right
    after: stock layers read it from ``vllm_config.model_config.hf_config`` or from a config captured in a closure
    (Qwen2-MoE, Mixtral), and both are this object. Layers keep the count they were built with.
    """
    stock_make_layers: Callable[..., Any] = module.make_layers
    config = model_config.hf_text_config
    field = _count_field(config)
    widest = getattr(config, field)

    def build_with_counts(num_hidden_layers: int, layer_fn: Callable[..., nn.Module], prefix: str, *a: Any, **k: Any):
        def layer(prefix: str) -> nn.Module:
            match = _LAYER_INDEX.search(prefix)
            i = int(match.group(1)) if match else None
            if i is None or i >= len(counts) or counts[i] is None:
                return layer_fn(prefix=prefix)
            setattr(config, field, counts[i])
            try:
                return layer_fn(prefix=prefix)
            finally:
                setattr(config, field, widest)
        return stock_make_layers(num_hidden_layers, layer, prefix, *a, **k)

    module.make_layers = build_with_counts
    try:
        yield
    finally:
        module.make_layers = stock_make_layers


def per_layer_class(arch: str) -> type:
    """vLLM's stock class for ``arch``, building each decoder layer with ``layer_num_experts[i]`` experts."""
    module = importlib.import_module(f"vllm.model_executor.models.{VLLM_ARCHITECTURES[arch]}")
    stock = getattr(module, arch)

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        model_config = vllm_config.model_config
        counts = getattr(model_config.hf_text_config, LAYER_COUNTS_FIELD, None)
        if not counts:
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
            return
        if getattr(vllm_config.parallel_config, "enable_eplb", False):
            raise ValueError("expert-parallel load balancing (EPLB) assumes one expert count in every layer; "
                             "serve this allocopt export without --enable-eplb")
        with _per_layer_construction(module, model_config, list(counts)):
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)

    return type(arch, (stock,), {"__init__": __init__, "__module__": __name__, "__qualname__": arch,
                                 "__doc__": f"vLLM's {arch} with one expert count per MoE layer (allocopt export)."})


def __getattr__(name: str) -> type:
    if name not in VLLM_ARCHITECTURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = per_layer_class(name)
    globals()[name] = cls
    return cls
