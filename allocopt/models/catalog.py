"""Which causal-LM model types of the installed transformers have routed experts, computed, never listed.

A type counts when transformers ships a ``*ForCausalLM`` class for it (the causal-LM auto mapping, or a class whose
``config_class.model_type`` is the type, as for ``mistral4``) and its default config names an expert count
(a key containing ``expert``, in the config or a nested part of it such as ``text_config`` or DBRX's ``ffn_config``,
vision and audio towers aside). A newer transformers that adds a family
therefore shows up here, and the family test fails until the family is supported or listed as unsupported.

Example::

    types = moe_causal_lm_types()        # {"deepseek_v3": "DeepseekV3ForCausalLM", ...}
"""
from __future__ import annotations

import functools
import warnings
from typing import Any


def _mentions_experts(d: dict[str, Any]) -> bool:
    """A key naming experts in the config or a nested part of it other than a vision/audio tower's."""
    for key, value in d.items():
        key = str(key).lower()
        if "expert" in key:
            return True
        if isinstance(value, dict) and not any(t in key for t in ("vision", "audio")) and _mentions_experts(value):
            return True
    return False


@functools.cache
def moe_causal_lm_types() -> dict[str, str]:
    """``{model_type: causal-LM class name}`` for every type of the installed transformers with routed experts."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for name in dir(transformers):
        if name.endswith("ForCausalLM"):
            try:
                model_type = getattr(getattr(getattr(transformers, name), "config_class", None), "model_type", None)
            except Exception:                      # a lazily imported class whose optional dependency is missing
                continue
            if model_type and model_type not in classes and model_type in CONFIG_MAPPING:
                classes[model_type] = name
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type, cls in sorted(classes.items()):
            config_class = CONFIG_MAPPING[model_type]
            try:
                moe = _mentions_experts(config_class().to_dict())
            except Exception:                      # defaults that fail validation: read the class's fields instead
                moe = any("expert" in name.lower() for name in getattr(config_class, "__annotations__", {}))
            if moe:
                out[model_type] = cls
    return out
