"""Wrap a module's forward for the duration of a context, inside any accelerate hook the module carries.

accelerate dispatches a model across devices (or offloads it to CPU/disk) by replacing ``module.forward`` with a
wrapper that moves the module's weights onto its execution device, calls the original forward (kept as
``module._old_forward``) and offloads the weights again. allocopt's own wrappers (masking, the observer, the
routing probe) must run *inside* that, where the weights are real tensors: so they wrap ``_old_forward`` when the
module has an accelerate hook, ``forward`` otherwise. Wrappers nest; each restore puts back what it replaced.

    restore = shadow_forward(router, lambda own: lambda *a, **k: own(*a, **k) * 2)
    ...
    restore()
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

Forward = Callable[..., Any]


def shadow_forward(module: nn.Module, make: Callable[[Forward], Forward]) -> Callable[[], None]:
    """Replace the forward ``module`` runs with ``make(current)``; returns the function that undoes it."""
    attr = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    had = attr in module.__dict__
    previous = module.__dict__.get(attr)
    setattr(module, attr, make(getattr(module, attr)))

    def restore() -> None:
        if had:
            setattr(module, attr, previous)
        else:
            module.__dict__.pop(attr, None)
    return restore


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first real tensor."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device token ids must be on: where the input embeddings compute (not ``next(model.parameters())``, which
    for a dispatched model may be another GPU, the CPU or the meta device of an offloaded weight)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the context ``module``'s own weights are real tensors even if accelerate offloaded them (read them
    again inside: onloading replaces the parameter objects)."""
    if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield module
    else:
        yield module
