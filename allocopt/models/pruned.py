"""The pruned-checkpoint format and its loader.

A pruned checkpoint is a stock transformers checkpoint plus ``config.layer_num_experts`` (one count per decoder
layer, ``None`` for dense layers); the family's count field holds the largest count. Stock ``from_pretrained``
builds every layer at that largest size, so :func:`load_pruned` uses a subclass that shrinks each layer right after
``__init__`` (on the meta device) and keeps the stock ``__name__`` and ``__module__``: transformers applies its
weight-renaming rules only to classes it recognises as its own.

    model = load_pruned("out/")       # same logits as mask_experts(full_model, plan.kept)
"""
from __future__ import annotations

import copy
import errno
import functools
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.models.adapter import find_moe_blocks, invalidate
from allocopt.models.quantization import dequantized_state, packs_experts
from allocopt.models.surgery import LAYER_COUNTS_FIELD, prune_block
from allocopt.plan import PLAN_FILE, require_compressed_tensors


@functools.cache
def pruned_class(base: type) -> type:
    """``base`` whose layers shrink to ``config.layer_num_experts`` right after construction (meta device
    inside ``from_pretrained``); the real weights then load into the smaller shapes."""

    class Pruned(base):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            counts = getattr(config, LAYER_COUNTS_FIELD, None) or []
            for b in find_moe_blocks(self):
                n = counts[b.layer] if b.layer < len(counts) else None
                if n is not None and n != b.info.num_experts:
                    prune_block(b, range(n))
            invalidate(self)

    Pruned.__name__, Pruned.__qualname__, Pruned.__module__ = base.__name__, base.__qualname__, base.__module__
    return Pruned


def _stock_class(config: Any, path: Path) -> type:
    arch = (getattr(config, "architectures", None) or [None])[0]
    base = getattr(transformers, arch, None) if arch else None
    if not (isinstance(base, type) and base.__module__.startswith("transformers.")):
        raise AllocoptError(f"{path}/config.json names architecture {arch!r}, which is not a transformers class; "
                            "allocopt loads pruned checkpoints with stock transformers classes only")
    return base


def load_pruned(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu", config: Any = None,
                **placement: Any) -> nn.Module:
    """Load an allocopt checkpoint with the stock transformers class, strictly: any missing, unexpected or
    mis-shaped weight is an error (a silently re-initialised expert would be a different model).
    ``placement``: transformers' ``device_map``/``max_memory``/``offload_folder`` (the model then stays where
    accelerate put it instead of moving to ``device``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AllocoptError(f"{path} has no config.json; pass a directory written by `allocopt prune`")
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    cls = pruned_class(_stock_class(config, path))
    model = strict_from_pretrained(cls.from_pretrained, path, config, dtype=dtype, **placement)
    return (model if placement else model.to(device)).eval()


def _from_state(load: Any, state: dict, path: Path, **kwargs: Any) -> Any:
    """``load`` (a ``from_pretrained``) of the checkpoint at ``path`` with its tensors given as ``state``
    (transformers takes a state dict only without a path; the config comes from ``kwargs``)."""
    kwargs.pop("use_safetensors", None)
    owner = getattr(load, "__self__", None)
    if isinstance(owner, type) and owner.__name__.startswith("Auto"):    # an auto class needs a path: its model class
        load = owner._model_mapping[type(kwargs["config"])].from_pretrained
    return load(None, state_dict=state, **kwargs)


def strict_from_pretrained(load: Any, path: Path, config: Any, **kwargs: Any) -> nn.Module:
    """``load(path, config=config, ...)`` (a ``from_pretrained``) that refuses a checkpoint which does not match its
    config: transformers re-initialises missing weights with a warning only, which would be a different model.
    Routed experts packed by ``allocopt prune`` (a plan with bits) are decompressed here, each layer with its own
    scheme (``models.quantization.dequantized_state``), and load as dense weights."""
    quantization = getattr(config, "quantization_config", None)
    if packs_experts(quantization):
        require_compressed_tensors()
        try:
            state = dequantized_state(path, quantization)
        except ValueError as exc:
            raise AllocoptError(f"checkpoint {path}: {exc}; re-export it with `allocopt prune`") from exc
        config = copy.deepcopy(config)
        del config.quantization_config
        load = functools.partial(_from_state, load, state)
    try:
        model, report = load(path, config=config, dtype=kwargs.pop("dtype", None) or "auto", use_safetensors=True,
                             output_loading_info=True, **kwargs)
    except RuntimeError as exc:          # transformers refuses mis-shaped weights itself
        raise AllocoptError(f"checkpoint {path} does not match its config ({str(exc).splitlines()[0][:200]}); "
                            f"{_fix_for(path, config)}") from exc
    except ValueError as exc:
        if "offload_folder" not in str(exc):
            raise
        raise AllocoptError("--max-memory leaves some weights for the disk but no --offload-dir was given; pass "
                            "--offload-dir DIR (a folder with room for the weights that do not fit)") from exc
    except (OSError, SafetensorError) as exc:   # a shard missing or cut short, or the offload folder out of room
        raise loading_error(exc, path, kwargs.get("offload_folder")) from exc
    problems = {k: sorted(v) for k, v in report.items() if v and k != "error_msgs"}
    if problems:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}" for k, v in problems.items())
        raise AllocoptError(f"checkpoint {path} does not match its config ({detail}); {_fix_for(path, config)}")
    return model


def _fix_for(path: Path, config: Any) -> str:
    """What to do about a checkpoint whose weights and config disagree."""
    if (path / PLAN_FILE).is_file() and getattr(config, LAYER_COUNTS_FIELD, None) is None:
        return (f"it looks like an allocopt export whose config.json lost \"{LAYER_COUNTS_FIELD}\" (its {PLAN_FILE} lists the "
                "kept experts): re-export it with `allocopt prune`")
    if getattr(config, LAYER_COUNTS_FIELD, None) is not None:
        return "re-export it with `allocopt prune`"
    return DAMAGED


DAMAGED = "the checkpoint is incomplete or damaged: copy it again from its source"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def loading_error(exc: Exception, path: Path, offload_folder: str | None) -> AllocoptError:
    """The one-line error for an OSError, SafetensorError or ValueError (a header that is not one) raised while a
    checkpoint loads: writing an offloaded weight (the --offload-dir is full or read-only), else reading the
    checkpoint (a shard missing or damaged)."""
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    filename = getattr(exc, "filename", None)
    filename = str(filename) if isinstance(filename, (str, Path)) else None
    if isinstance(exc, SafetensorError):
        writing = "while serializing" in reason              # save_file as transformers offloads (not "deserializing")
    elif filename is not None:
        writing = offload_folder is not None and Path(filename).resolve().is_relative_to(Path(offload_folder).resolve())
    else:
        writing = getattr(exc, "errno", None) in _WRITE_ERRNOS
    if writing and offload_folder is not None:
        why = getattr(exc, "strerror", None) or reason.rpartition("I/O error: ")[2]
        return AllocoptError(f"--offload-dir {offload_folder} could not take the offloaded weights ({why}); free space "
                             "there or pass an --offload-dir with room for the weights beyond --max-memory")
    named = filename or next(iter(re.findall(r"[^\s:'\"]+\.safetensors(?:\.index\.json)?", reason)), None)
    where = f"checkpoint file {named}" if named else f"a safetensors file of checkpoint {path}"
    return AllocoptError(f"{where} could not be read ({reason}); {DAMAGED}")


__all__ = ["DAMAGED", "LAYER_COUNTS_FIELD", "load_pruned", "loading_error", "pruned_class", "strict_from_pretrained"]
