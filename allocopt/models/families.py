"""Model knowledge as data: one row per transformers ``model_type``.

Generic discovery (``adapter.find_moe_blocks``) locates layers, MoE blocks, routers and experts for any
fused-experts model; this table only supplies what cannot be discovered: which config fields hold the
expert count and top-k, how the router turns logits into weights, and which tensors are selection-only
biases that masking must also set to -inf. Adding a family means adding a row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Selection-only bias paths, relative to the MoE block, tried for families not in the table.
GENERIC_SELECTION_BIAS_PATHS = ("gate.e_score_correction_bias", "router.e_score_correction_bias",
                                "gate.moe_statics.e_score_correction_bias", "e_score_correction_bias", "expert_bias")
GENERIC_SHARED_EXPERT_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")
# Integer attributes that carry a module's routed-expert count and must follow structural removal.
COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Family:
    model_type: str
    router_rule: str                                  # how logits become (ids, weights), e.g. "softmax->topk"
    count_field: str                                  # config field holding routed experts per MoE layer
    top_k_field: str = "num_experts_per_tok"
    renorm_field: str | None = None                   # config flag that appends "->renorm" to the rule
    shared_expert_attrs: tuple[str, ...] = ()         # block attributes holding always-on experts
    shared_count_field: str | None = None             # config field: shared experts merged into that module
    selection_bias_paths: tuple[str, ...] = ()        # block-relative paths of biases used only to choose experts
    group_field: str | None = None                    # config field of group-limited routing (DeepSeek n_group)

    def rule(self, config: Any) -> str:
        if self.renorm_field is not None and getattr(config, self.renorm_field, False):
            return self.router_rule + "->renorm"
        return self.router_rule


_DEEPSEEK_LIKE = dict(router_rule="sigmoid+bias->group-topk", count_field="n_routed_experts", renorm_field="norm_topk_prob",
                      shared_expert_attrs=("shared_experts",), shared_count_field="n_shared_experts",
                      selection_bias_paths=("gate.e_score_correction_bias",), group_field="n_group")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("olmoe", "softmax->topk", "num_experts", renorm_field="norm_topk_prob"),
    Family("qwen3_moe", "softmax->topk", "num_experts", renorm_field="norm_topk_prob"),
    Family("qwen2_moe", "softmax->topk", "num_experts", renorm_field="norm_topk_prob",
           shared_expert_attrs=("shared_expert",)),
    Family("qwen3_next", "softmax->topk", "num_experts", renorm_field="norm_topk_prob",
           shared_expert_attrs=("shared_expert",)),
    Family("mixtral", "softmax->topk->renorm", "num_local_experts"),
    Family("minimax", "softmax->topk->renorm", "num_local_experts"),
    Family("deepseek_v3", **_DEEPSEEK_LIKE),
    Family("glm4_moe", **_DEEPSEEK_LIKE),
    Family("gpt_oss", "topk->softmax", "num_local_experts"),
    Family("granitemoe", "topk->softmax", "num_local_experts"),
    Family("granitemoeshared", "topk->softmax", "num_local_experts", shared_expert_attrs=("shared_mlp",)),
    Family("jamba", "softmax->topk", "num_experts"),
    Family("ernie4_5_moe", "softmax+bias->topk->renorm", "moe_num_experts", top_k_field="moe_k",
           shared_expert_attrs=("shared_experts",), shared_count_field="moe_num_shared_experts",
           selection_bias_paths=("gate.moe_statics.e_score_correction_bias",)),
)}


def family_for(model_type: str) -> Family:
    """The table row, or a generic row whose rule is "unknown" (discovery still finds the pieces)."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return Family(model_type, "unknown", "num_experts", shared_expert_attrs=GENERIC_SHARED_EXPERT_ATTRS,
                  selection_bias_paths=GENERIC_SELECTION_BIAS_PATHS)
