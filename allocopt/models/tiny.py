"""Tiny random MoE models of every supported family, built from stock transformers configs.

Used by tests and benchmarks instead of hub downloads: 3 decoder layers, hidden 64, 8 experts, top-2,
vocab 256, fp32, eval mode. Selection biases (DeepSeek/GLM/ERNIE) are randomised because they are
initialised to zero, and a zero bias would hide bugs in how masking and export treat them.

Example::

    model = build_tiny_model("deepseek_v3", seed=1)
"""
from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

from allocopt.errors import AllocoptError

_COMMON: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               num_experts_per_tok=2, initializer_range=0.1, tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, causal-LM class, config overrides on top of _COMMON)
_RECIPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                                                                head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=48)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=8, head_dim=16, sliding_window=16,
                                                          layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
        moe_layer_end_index=2, head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
        topk_group=1, head_dim=16, partial_rotary_factor=0.5)),
}
FAMILIES: tuple[str, ...] = tuple(_RECIPES)
_SELECTION_BIASES = ("e_score_correction_bias",)


def build_tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of ``family`` (a transformers model_type), eval mode, fp32."""
    if family not in _RECIPES:
        raise AllocoptError(f"no tiny recipe for family {family!r}; choose one of {', '.join(FAMILIES)}")
    config_name, model_name, extra = _RECIPES[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **extra, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if name.endswith(_SELECTION_BIASES):
                    t.copy_(torch.rand_like(t) * 0.5)
    return model.float().eval()
