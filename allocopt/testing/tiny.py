"""Tiny random MoE models of every causal-LM family transformers ships, built from stock configs (no downloads).

Every family gets the same shape where its config allows: 3 decoder layers, hidden 64, 8 routed experts,
top-2, vocab 256, fp32, eval mode. The generic shrink (``_SHRINK``) sets whichever of the common size fields
a config has; ``_RECIPES`` holds what a family needs on top (its own field names, validation rules, layer
types that keep at least one attention layer). Families with group-limited routing get 2 groups with 1 kept,
so the tiny model exercises the group constraint.

Routers are initialised to zero or tie for some families (AFMoE), and selection biases start at zero, which
would hide a missed bias or a tie-breaking bug; so every router weight is redrawn and every selection bias is
randomised after construction.

Example::

    model = build_tiny_model("deepseek_v3", seed=1)
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers
from torch import nn

from allocopt.errors import AllocoptError
from allocopt.models.families import family_for

NUM_LAYERS = 3
NUM_EXPERTS = 8
TOP_K = 2

# Common size fields, applied where the family's config has the field.
_SHRINK: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, model_max_length=128,
    initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    num_experts=NUM_EXPERTS, num_local_experts=NUM_EXPERTS, n_routed_experts=NUM_EXPERTS, moe_num_experts=NUM_EXPERTS,
    num_experts_per_tok=TOP_K, num_experts_per_token=TOP_K, moe_k=TOP_K, moe_topk=TOP_K, top_k_experts=TOP_K,
    n_shared_experts=2, num_shared_experts=2, moe_num_shared_experts=2, shared_expert_intermediate_size=48,
    shared_experts_intermediate_size=32, moe_shared_expert_intermediate_size=48, expert_ffn_hidden_size=32,
    first_k_dense_replace=1, sliding_window=16, router_jitter_noise=0.0,
)
# Multi-head latent attention (DeepSeek-V2/V3 style): its own head sizes instead of head_dim.
_MLA: dict[str, Any] = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                            num_key_value_heads=4)
# Group-limited routing: 2 groups of 4 experts, the best 1 group is searched per token.
_GROUPS: dict[str, Any] = dict(n_group=2, topk_group=1)
# Shared-expert widths some families need to build one at all.
_SHARED_WIDTHS: dict[str, Any] = dict(shared_intermediate_size=48)

# model_type -> config values on top of the generic shrink (None drops a generic value the family rejects).
_RECIPES: dict[str, dict[str, Any]] = {
    "dbrx": dict(d_model=64, n_heads=4, n_layers=NUM_LAYERS, max_seq_len=128, num_key_value_heads=2,
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                 ffn_config=dict(hidden_size=64, ffn_hidden_size=32, moe_num_experts=NUM_EXPERTS, moe_top_k=TOP_K)),
    "longcat_flash": dict(num_layers=NUM_LAYERS, ffn_hidden_size=96, zero_expert_num=2, qk_head_dim=16, head_dim=8),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["full_attention", "conv", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=32, num_key_value_heads=2),
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
    "deepseek_v4": dict(num_key_value_heads=1, head_dim=16, q_lora_rank=24, o_lora_rank=16, o_groups=2, qk_rope_head_dim=8,
                        index_n_heads=2, index_head_dim=16, index_topk=8, sliding_window=4, hc_mult=2,
                        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                        mlp_layer_types=["hash_moe", "moe", "moe"],
                        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                        num_nextn_predict_layers=0),
    "gemma4_text": dict(enable_moe_block=True, hidden_size_per_layer_input=0, vocab_size_per_layer_input=256,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"], per_layer_config={}),
    "jetmoe": dict(kv_channels=16, num_key_value_heads=4),
    "hunyuan_v1_moe": dict(head_dim=16),
    "deepseek_v2": dict(topk_method="group_limited_greedy"),
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    "mistral4": dict(num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=16,
                     kv_lora_rank=16, q_lora_rank=16),
    "qwen4_exp_text": dict(hc_count=2, hc_lowrank=8, layer_types=["linear_attention", "linear_attention", "indexed_attention"],
                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                           linear_value_head_dim=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                           indexer_budget=4, indexer_compress_ratio=2, num_key_value_heads=4, head_dim=8),
    "inkling2_text": dict(swa_head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=4, head_dim=8,
                          num_key_value_heads=4, unpadded_vocab_size=256),
    "inkling2_loop_text": dict(swa_head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=4, head_dim=8,
                               num_key_value_heads=4, unpadded_vocab_size=256),
    "phimoe": dict(router_jitter_noise=0.01),
    "dots3_note_text": dict(per_layer_config={str(i): dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                                                           kv_lora_rank=16, head_dim=16, qk_nope_head_dim=8, v_head_dim=16,
                                                           qk_rope_head_dim=8) for i in range(NUM_LAYERS)},
                            index_head_dim=16, index_n_heads=2, index_topk=8),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8),
    "kimi_linear": dict(linear_head_dim=16, linear_num_heads=4),
    # at most heads/kv-heads indexer heads; a sparse pool smaller than a test row; layer 2 reads layer 1's K/V as in
    # the released layout
    "kolibri1_1": dict(index_num_heads=2, index_topk=4, index_pool_size=8, index_compression=2,
                       index_num_local_tokens=2, index_num_sink_tokens=1, kv_source_layers=[0, 1, 1],
                       mlp_only_layers=[0], mlp_only_intermediate_size=96),
    "ergo": dict(first_dense_intermediate_size=96),
    "nemotron_h": dict(layers_block_type=["moe", "full_attention", "moe"], mamba_num_heads=4, mamba_head_dim=16,
                       n_groups=2, ssm_state_size=16, chunk_size=8, moe_latent_size=None,
                       mtp_layers_block_type=["full_attention", "moe"], num_nextn_predict_layers=0),
}


def _config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise AllocoptError(f"transformers {transformers.__version__} has no model type {model_type!r}; "
                            "pass a type from allocopt.models.catalog.moe_causal_lm_types()")
    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The family's stock config at the tiny shape; ``overrides`` win over the recipe."""
    config_class = _config_class(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            defaults = config_class().to_dict()
        except Exception:
            defaults = {name: None for name in getattr(config_class, "__annotations__", {})}
    values = {k: v for k, v in {**_SHRINK, **_SHARED_WIDTHS}.items() if k in defaults}
    if "qk_rope_head_dim" in defaults:
        values.update({k: v for k, v in _MLA.items() if k in defaults})
        values["head_dim"] = _MLA["qk_rope_head_dim"]
    family = family_for(model_type)
    if family.group_fields is not None:
        values.update(dict(zip(family.group_fields, (_GROUPS["n_group"], _GROUPS["topk_group"]))))
    layers = defaults.get("num_hidden_layers")
    for key, value in defaults.items():            # per-layer lists: keep a prefix, but keep every kind in it
        if isinstance(value, list) and layers and len(value) == layers and key not in values:
            values[key] = _per_layer_prefix(value)
    values.update(_RECIPES.get(model_type, {}))
    if "text_config" in defaults:                   # composite (multimodal) config: shrink the text part
        text_type = (defaults["text_config"] or {}).get("model_type") or f"{model_type}_text"
        text = tiny_config(text_type)
        values = {"text_config": text.to_dict()}
        for sub in ("vision_config", "audio_config"):      # the causal LM never builds them; widths must still agree
            if sub in defaults:
                tower = defaults[sub] if isinstance(defaults[sub], dict) else {}
                values[sub] = {"adapter_out_dim": text.hidden_size} if "adapter_out_dim" in tower else None
    values.update(overrides)
    values = {k: v for k, v in values.items() if v is not None or k in ("moe_latent_size",)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(**values)


def _per_layer_prefix(value: list) -> list:
    """NUM_LAYERS entries that hold every kind of the list: its first entry, then the other kinds in order of
    appearance, the last repeated (so dense-first MoE lists keep two MoE layers and hybrids one attention layer)."""
    kinds = list(dict.fromkeys(value[1:]))
    others = [k for k in kinds if k != value[0]] or [value[0]]
    rest = others[: NUM_LAYERS - 1]
    return [value[0], *rest, *[rest[-1]] * (NUM_LAYERS - 1 - len(rest))]


def build_tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random causal LM of ``model_type`` (fp32, eval mode) with randomised routers and selection biases."""
    from allocopt.models.catalog import moe_causal_lm_types
    from allocopt.runtime.loading import instantiate

    config = tiny_config(model_type, **overrides)
    if model_type not in moe_causal_lm_types():
        raise AllocoptError(f"{model_type!r} is not a causal-LM type with routed experts in transformers "
                            f"{transformers.__version__}; pass one of allocopt.models.catalog.moe_causal_lm_types()")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = instantiate(config)
        _randomise_routing(model)
    return model.float().eval()


def _randomise_routing(model: nn.Module) -> None:
    """Redraw router weights (N(0, 1/sqrt(H))) and the routed experts' selection biases (U[0, 0.5)) of every MoE
    block; a tail (skip class, zero experts) keeps its own initial bias."""
    from allocopt.models.adapter import find_moe_blocks

    try:
        blocks = find_moe_blocks(model)
    except AllocoptError:
        return                                     # nothing routed to randomise (the adapter reports it later)
    with torch.no_grad():
        for b in blocks:
            w = b.router_weight
            w.copy_(torch.randn_like(w) / w.shape[-1] ** 0.5)
            for bias in b.selection_biases():
                routed = bias[..., : b.info.num_experts]
                routed.copy_(torch.rand_like(routed) * 0.5)
