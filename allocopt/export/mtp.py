"""Multi-token-prediction (MTP) layers in an export: said, never silently claimed.

DeepSeek-V3/R1, GLM-4.5 and others publish MTP modules (``num_nextn_predict_layers``; transformers' ``num_mtp_layers``)
as extra decoder layers after the trunk (``model.layers.{num_hidden_layers + k}.*``, each an MoE layer with the full
expert set) that transformers' causal LM skips on load and loads only for ``generate(use_mtp=True)``; vLLM loads
them for its MTP speculative decoding. allocopt scores and prunes the trunk; its export does not carry the MTP
layers (their experts would need their own plan entry, and a whole MTP layer does not fit a model whose layers the
plan resized), so the export's config says ``num_mtp_layers = 0`` instead of claiming layers it does not hold, and
a source that held MTP weights gets one warning line.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from allocopt.models.adapter import text_config
from allocopt.runtime.converted import checkpoint_tensors

log = logging.getLogger(__name__)


def mtp_weights_in(source: Any, first_extra_layer: int) -> int:
    """MTP layers whose weights a source checkpoint directory holds (decoder layer indices at or above
    ``first_extra_layer``); 0 for a source that is not a directory of safetensors files."""
    if not source or not Path(str(source)).is_dir():
        return 0
    try:
        names = checkpoint_tensors(Path(str(source)))
    except (OSError, ValueError, KeyError):
        return 0
    found = {int(m.group(1)) for m in (re.search(r"layers\.(\d+)\.", n) for n in names) if m}
    return len({i for i in found if i >= first_extra_layer})


def drop_mtp(model: Any) -> None:
    """Set the export config's MTP layer count to 0 (the export holds none), warning where the source had some."""
    config = text_config(model)
    claimed = int(getattr(config, "num_mtp_layers", 0) or 0)
    if not claimed:
        return
    held = mtp_weights_in(getattr(model, "name_or_path", None), int(config.num_hidden_layers))
    for target in {id(model.config): model.config, id(config): config}.values():
        if getattr(target, "num_mtp_layers", None):
            target.num_mtp_layers = 0
    if held:
        log.warning("the source's %d multi-token-prediction layer(s) are not in the export (allocopt prunes the trunk; "
                    "MTP layers would need their own plan entry): its config says num_mtp_layers = 0, so it serves "
                    "without MTP speculative decoding", held)
