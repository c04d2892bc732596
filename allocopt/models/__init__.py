"""Model adapter: find MoE blocks, describe them as data, mask experts, export and reload pruned models.

Model knowledge lives in ``families.py`` (one row per model_type); everything else is generic.
"""
from __future__ import annotations

from allocopt.models.adapter import MoEBlock, MoELayerInfo, ModelInfo, describe, find_moe_blocks, model_fingerprint
from allocopt.models.export import load_pruned, prune_model, save_pruned
from allocopt.models.families import Family, family_for
from allocopt.models.loading import load_model
from allocopt.models.masking import mask_experts

__all__ = ["Family", "MoEBlock", "MoELayerInfo", "ModelInfo", "describe", "family_for", "find_moe_blocks",
           "load_model", "load_pruned", "mask_experts", "model_fingerprint", "prune_model", "save_pruned"]
