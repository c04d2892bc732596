"""Understanding and changing a loaded model: find its MoE blocks and describe them as data (``adapter``), the family
table (``families``), router rules (``routing``) and the probe that checks them (``router_probe``), masking experts
(``masking``), removing them (``surgery``), and the pruned-checkpoint format and its loader (``pruned``).

Model knowledge lives in ``families.py`` (one row per model_type); everything else is generic.
"""
from __future__ import annotations

from allocopt.models.adapter import MoEBlock, MoELayerInfo, ModelInfo, describe, find_moe_blocks, model_fingerprint
from allocopt.models.families import Family, family_for
from allocopt.models.masking import mask_experts
from allocopt.models.pruned import load_pruned
from allocopt.models.surgery import prune_model

__all__ = ["Family", "MoEBlock", "MoELayerInfo", "ModelInfo", "describe", "family_for", "find_moe_blocks",
           "load_pruned", "mask_experts", "model_fingerprint", "prune_model"]
