"""The self-contained export: a compact checkpoint that carries its own modelling code (``auto_map``).

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` then loads it where allocopt is not installed
(plain transformers, lm-evaluation-harness's ``hf`` model). The written module needs only torch and transformers: a
subclass of the stock class that, right after ``__init__``, gives every tensor whose shape the pruning changed its
pruned shape (a table of names and shapes computed here from the pruned model against the stock class built at the
config's largest count), and sets the modules' expert-count attributes.

transformers 5 skips its built-in weight-format conversions for remote code (spec serving.md section 1.1,
``conversion_mapping.py``); the module registers the stock conversions of its ``model_type`` under its own class
name with the public ``register_checkpoint_conversion_mapping``, so per-expert checkpoint keys still load into the
fused expert tensors.

Example::

    write_modeling_code(model, "out/")     # after model.save_pretrained("out/"): adds modeling_allocopt.py + auto_map
"""
from __future__ import annotations

import inspect
import json
import pprint
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from allocopt.io import atomic_write_json, atomic_write_text
from allocopt.models.adapter import find_moe_blocks, text_config
from allocopt.models.families import COUNT_ATTRS
from allocopt.models.quantization import dequantized_state, packs_experts

MODELING_FILE = "modeling_allocopt.py"
CLASS_PREFIX = "Allocopt"

_TEMPLATE = '''"""Modelling code of a checkpoint pruned by allocopt {version}: {base} with its own expert count per layer.

Load with ``AutoModelForCausalLM.from_pretrained(this_dir, trust_remote_code=True)``; needs only torch and
transformers, and compressed-tensors where experts are packed (written for transformers {transformers_version}). {cls}
builds the stock {base}, then gives each tensor below its pruned shape (the weights then load into those shapes) and
sets each module's expert count.
"""
import torch
from torch import nn
from transformers import {base}

try:  # transformers 5 skips its weight-format conversions for remote code unless they are registered by class name
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
except ImportError:  # transformers 4 has no conversions to apply
    get_checkpoint_conversion_mapping = register_checkpoint_conversion_mapping = None

# tensor name -> shape after pruning (tensors not listed keep the stock shape)
SHAPES = {shapes}
# module path -> {{attribute: value}}: expert counts stored on modules
ATTRS = {attrs}
# module path -> {{config field: value}}: modules that read their expert count from their own config
CONFIG_COUNTS = {config_counts}
# True: the routed experts of some layers are packed (compressed-tensors pack-quantized, one scheme per bit-width),
# which transformers decompresses with one scheme for all layers; this class decompresses each with its own instead
PACKED_EXPERTS = {packed}


class {cls}({base}):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, shape in SHAPES.items():
            owner_path, _, attr = name.rpartition(".")
            owner = self.get_submodule(owner_path)
            old = getattr(owner, attr)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                owner._buffers[attr] = new
        for path, values in ATTRS.items():
            for attr, value in values.items():
                setattr(self.get_submodule(path), attr, value)
        views = {{}}
        for path, values in CONFIG_COUNTS.items():
            module = self.get_submodule(path)
            key = tuple(sorted(values.items()))
            if key not in views:
                views[key] = module.config.__class__.from_dict({{**module.config.to_dict(), **values}})
            module.config = views[key]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if not PACKED_EXPERTS or pretrained_model_name_or_path is None or config is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        import copy
        import os

        directory = pretrained_model_name_or_path
        if not os.path.isdir(directory):            # a hub id: its files in the local cache
            from huggingface_hub import snapshot_download

            directory = snapshot_download(directory)
        quantization = config.quantization_config
        config = copy.deepcopy(config)
        del config.quantization_config
        kwargs.pop("use_safetensors", None)
        state = dequantized_state(directory, quantization if isinstance(quantization, dict) else quantization.to_dict())
        return super().from_pretrained(None, *args, **{{**kwargs, "config": config, "state_dict": state}})


{dequantize}


if register_checkpoint_conversion_mapping is not None:
    _stock = get_checkpoint_conversion_mapping({model_type!r})
    if _stock is not None:
        register_checkpoint_conversion_mapping({cls!r}, _stock, overwrite=True)
'''


def _stock_class(model: nn.Module) -> type:
    """The transformers class the pruned model was built from (``load_pruned`` returns a same-named subclass)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model class")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def pruned_structure(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
    """``(shapes, attrs, config_counts)`` where the pruned ``model`` differs from its stock class built from its config
    (whose count field holds the largest count). All empty for a model the stock class loads as it is."""
    stock_cls = _stock_class(model)
    with torch.device("meta"):
        skeleton = stock_cls(model.config)
    stock = _tensors(skeleton)
    shapes = {name: list(t.shape) for name, t in _tensors(model).items()
              if name in stock and tuple(stock[name].shape) != tuple(t.shape)}
    stock_modules = dict(skeleton.named_modules())
    attrs: dict[str, dict[str, int]] = {}
    config_counts: dict[str, dict[str, Any]] = {}
    root = text_config(model)
    blocks = tuple(b.path for b in find_moe_blocks(model))
    for path, module in model.named_modules():
        ref = stock_modules.get(path)
        if ref is None or not path.startswith(blocks):      # pruning changes counts inside MoE blocks only
            continue
        for attr in (*COUNT_ATTRS, "out_features"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value != getattr(ref, attr, None):
                attrs.setdefault(path, {})[attr] = value
        own = getattr(module, "config", None)
        if own is not None and own is not root and own is not model.config:
            diff = {k: v for k, v in own.to_dict().items() if k in COUNT_ATTRS and v != getattr(root, k, None)}
            if diff:
                config_counts[path] = diff
    return shapes, attrs, config_counts


def write_modeling_code(model: nn.Module, out_dir: str | Path) -> bool:
    """Write ``modeling_allocopt.py`` and add ``auto_map`` to ``out_dir/config.json`` (saved from ``model``).

    Returns False, writing nothing, when the stock class loads the checkpoint as it is (every layer keeps the same
    count and no expert is packed: packed experts of several bit-widths need the module's own decompression).
    Raises TypeError for a model that is not a transformers class.
    """
    out_dir = Path(out_dir)
    shapes, attrs, config_counts = pruned_structure(model)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    packed = packs_experts(config.get("quantization_config"))
    if not (shapes or attrs or config_counts or packed):
        return False
    base = _stock_class(model).__name__
    cls = CLASS_PREFIX + base
    fmt = lambda obj: pprint.pformat(obj, width=110, sort_dicts=True)      # noqa: E731
    from allocopt import __version__

    atomic_write_text(out_dir / MODELING_FILE, _TEMPLATE.format(
        version=__version__, transformers_version=transformers.__version__, base=base, cls=cls,
        shapes=fmt(shapes), attrs=fmt(attrs), config_counts=fmt(config_counts), model_type=model.config.model_type,
        packed=packed, dequantize=inspect.getsource(dequantized_state) if packed else ""))
    config["auto_map"] = {**config.get("auto_map", {}), "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{cls}"}
    atomic_write_json(config_path, config)
    return True


__all__ = ["MODELING_FILE", "pruned_structure", "write_modeling_code"]
