"""Model knowledge as data: one row per transformers ``model_type`` with routed experts.

Generic discovery (``adapter.find_moe_blocks``) locates layers, MoE blocks, routers and experts; a row supplies
what discovery cannot see: which config fields hold the expert count and top-k, the router rule (checked
against the real router by ``routing.verify`` in the tests), shared experts, selection-only biases, group-limited
routing, and the few layouts that are not "stacked experts called as experts(hidden, index, weights)".
Adding a family means adding a row; a type without a row gets a generic row whose rule is inferred by running
its router (``routing.infer``), or ``unknown`` when no candidate reproduces it.

Rows were written from the transformers 5.24 and 5.25 modelling code; ``tests/test_families.py`` runs every type of the
installed transformers through describe -> run -> prune -> export == masked and checks each rule by execution.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from allocopt.models.routing import RouterRule

# Selection-only bias paths (relative to the MoE block) and shared-expert attributes tried for unknown types.
GENERIC_SELECTION_BIAS_PATHS = ("gate.e_score_correction_bias", "router.e_score_correction_bias",
                                "gate.moe_statics.e_score_correction_bias", "e_score_correction_bias", "expert_bias")
GENERIC_SHARED_EXPERT_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")
GENERIC_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
GENERIC_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
GENERIC_SHARED_COUNT_FIELDS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
# Integer attributes that carry a module's routed-expert count and must follow structural removal.
COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
               "total_experts", "num_router_classes")


@dataclass(frozen=True)
class Family:
    model_type: str
    rule: RouterRule
    count_field: str                                  # config field (dotted) holding routed experts per MoE layer
    top_k_field: str = "num_experts_per_tok"
    shared_expert_attrs: tuple[str, ...] = ()         # block (or decoder-layer) attributes holding always-on experts
    shared_count_field: str | None = None             # config field: shared experts fused into one module
    selection_bias_paths: tuple[str, ...] = ()        # block-relative paths of biases used only to choose experts
    group_fields: tuple[str, str] | None = None       # config fields (groups, groups kept) of group-limited routing
    block_path: str | None = None                     # the MoE block inside a decoder layer, where discovery would err
    router_weight: str | None = None                  # router-relative parameter with one row per expert
    router_tail: str | None = None                    # rows after the routed ones: "shared" | "skip" | "zero" experts
    tail_field: str | None = None                     # config field counting those rows (1 when None)
    experts_call: str = "standard"                    # "standard" | "input-scaled" (Llama-4) | "parallel" (JetMoE)
    expert_layout: str = "stacked"                    # "stacked" on dim 0 | "flattened" [E*I, H] (DBRX)
    hash_layers: tuple[str, str] | None = None        # (config list field, kind): layers routed by a token-id table
    count_field_shared: bool = False                  # the count also sizes other modules (JetMoE attention experts)
    unsupported: str | None = None                    # why this type cannot be pruned

    def with_type(self, model_type: str) -> "Family":
        return replace(self, model_type=model_type)


def _rows(types: str, template: Family) -> dict[str, Family]:
    return {t: template.with_type(t) for t in types.split()}


# ---- router rules shared by many families ---------------------------------------------------------------------------
SOFTMAX_TOPK = RouterRule("softmax", renorm="norm_topk_prob")
SOFTMAX_TOPK_RENORM = RouterRule("softmax", renorm=True)
TOPK_SOFTMAX = RouterRule("logits", weights="softmax-topk")
DEEPSEEK_V3 = RouterRule("sigmoid", bias_on="scores", group="top2-sum", renorm="norm_topk_prob", eps=1e-20,
                         scale="routed_scaling_factor")
SIGMOID_BIAS_RENORM = RouterRule("sigmoid", bias_on="scores", renorm=True, eps=1e-20)

_GROUPS = ("n_group", "topk_group")
_DSV3 = Family("deepseek_v3", DEEPSEEK_V3, "n_routed_experts", shared_expert_attrs=("shared_experts",),
               shared_count_field="n_shared_experts", selection_bias_paths=("gate.e_score_correction_bias",),
               group_fields=_GROUPS)

FAMILIES: dict[str, Family] = {
    # softmax over all experts -> top-k (-> renorm)
    **_rows("olmoe qwen3_moe flex_olmo mellum", Family("", SOFTMAX_TOPK, "num_experts")),
    **_rows("qwen2_moe qwen3_next qwen4_exp_text", Family("", SOFTMAX_TOPK, "num_experts",
                                                          shared_expert_attrs=("shared_expert",))),
    "qwen3_5_moe_text": Family("qwen3_5_moe_text", SOFTMAX_TOPK_RENORM, "num_experts", shared_expert_attrs=("shared_expert",)),
    "lara_mini": Family("lara_mini", SOFTMAX_TOPK, "num_experts", shared_expert_attrs=("shared_expert",)),
    **_rows("mixtral minimax", Family("", SOFTMAX_TOPK_RENORM, "num_local_experts")),
    "phimoe": Family("phimoe", RouterRule(select="sparsemixer", jitter="router_jitter_noise"), "num_local_experts"),
    "hunyuan_v1_moe": Family("hunyuan_v1_moe", SOFTMAX_TOPK_RENORM, "num_experts", top_k_field="moe_topk",
                             shared_expert_attrs=("shared_mlp",)),
    "jamba": Family("jamba", RouterRule("softmax"), "num_experts"),
    "dbrx": Family("dbrx", RouterRule("softmax", renorm="pnorm:ffn_config.moe_normalize_expert_weights"),
                   "ffn_config.moe_num_experts", top_k_field="ffn_config.moe_top_k", expert_layout="flattened",
                   router_weight="layer.weight"),
    "gemma4_text": Family("gemma4_text", RouterRule("softmax", renorm=True, scale="param:per_expert_scale"),
                          "num_experts", top_k_field="top_k_experts"),
    "ernie4_5_moe": Family("ernie4_5_moe", RouterRule("softmax", bias_on="scores", renorm="clamp:moe_norm_min"),
                           "moe_num_experts", top_k_field="moe_k", shared_expert_attrs=("shared_experts",),
                           shared_count_field="moe_num_shared_experts",
                           selection_bias_paths=("gate.moe_statics.e_score_correction_bias",)),
    "longcat_flash": Family("longcat_flash", RouterRule("softmax", bias_on="scores", scale="routed_scaling_factor"),
                            "n_routed_experts", top_k_field="moe_topk",
                            selection_bias_paths=("router.e_score_correction_bias",), router_weight="classifier.weight",
                            router_tail="zero", tail_field="zero_expert_num"),
    "zaya": Family("zaya", RouterRule("softmax", bias_on="scores"), "num_experts",
                   selection_bias_paths=("gate.balancing_biases",), router_weight="router_mlp.out_proj.weight",
                   router_tail="skip"),
    # top-k on the logits -> softmax (or sigmoid) over the chosen ones
    **_rows("granitemoe granitemoe_swa gpt_oss", Family("", TOPK_SOFTMAX, "num_local_experts")),
    **_rows("granitemoeshared granitemoehybrid", Family("", TOPK_SOFTMAX, "num_local_experts",
                                                        shared_expert_attrs=("shared_mlp",))),
    "aria_text": Family("aria_text", TOPK_SOFTMAX, "moe_num_experts", top_k_field="moe_topk",
                        shared_expert_attrs=("shared_experts",), shared_count_field="moe_num_shared_experts"),
    "jetmoe": Family("jetmoe", TOPK_SOFTMAX, "num_local_experts", block_path="mlp", router_weight="layer.weight",
                     experts_call="parallel", count_field_shared=True),
    "cohere2_moe": Family("cohere2_moe", RouterRule("logits", weights="config:expert_selection_fn", renorm="norm_topk_prob"),
                          "num_experts", shared_expert_attrs=("shared_experts",), shared_count_field="num_shared_experts"),
    "llama4_text": Family("llama4_text", RouterRule("logits", weights="sigmoid-topk"), "num_local_experts",
                          shared_expert_attrs=("shared_expert",), experts_call="input-scaled"),
    **_rows("kolibri1 kolibri1_1", Family(
        "", RouterRule("sigmoid", bias_on="logits", weights="sigmoid-topk", renorm="norm_topk_prob"),
        "num_local_experts", shared_expert_attrs=("shared_experts",), selection_bias_paths=("gate.e_score_correction_bias",))),
    # sigmoid scores, selection bias, no groups
    "flint": Family("flint", RouterRule("sigmoid", renorm="norm_topk_prob"), "num_experts", shared_expert_attrs=("shared_expert",)),
    "afmoe": Family("afmoe", replace(SIGMOID_BIAS_RENORM, scale="route_scale"), "num_experts",
                    shared_expert_attrs=("shared_experts",), shared_count_field="num_shared_experts",
                    selection_bias_paths=("expert_bias",)),
    "hy_v3": Family("hy_v3", replace(SIGMOID_BIAS_RENORM, scale="router_scaling_factor"), "num_experts",
                    shared_expert_attrs=("shared_experts",), shared_count_field="num_shared_experts",
                    selection_bias_paths=("e_score_correction_bias",)),
    "ergo": Family("ergo", replace(SIGMOID_BIAS_RENORM, scale="moe_routed_scaling_factor"), "num_experts",
                   shared_expert_attrs=("shared_experts",), selection_bias_paths=("gate.e_score_correction_bias",)),
    "minimax_m2": Family("minimax_m2", replace(SIGMOID_BIAS_RENORM, eps=0.0), "num_local_experts",
                         selection_bias_paths=("e_score_correction_bias",)),
    "minimax_m3_vl_text": Family("minimax_m3_vl_text", replace(SIGMOID_BIAS_RENORM, eps=0.0, output_scale="routed_scaling_factor"),
                                 "num_local_experts", shared_expert_attrs=("shared_experts",),
                                 selection_bias_paths=("gate.e_score_correction_bias",)),
    "laguna": Family("laguna", replace(SIGMOID_BIAS_RENORM, eps=0.0, softcap="moe_router_logit_softcapping",
                                       output_scale="moe_routed_scaling_factor"),
                     "num_experts", shared_expert_attrs=("shared_experts",), selection_bias_paths=("gate.e_score_correction_bias",)),
    **_rows("inkling2_text inkling2_loop_text", Family(
        "", replace(SIGMOID_BIAS_RENORM, score="config:scoring_func", scale="routed_scaling_factor"), "n_routed_experts",
        selection_bias_paths=("gate.e_score_correction_bias",))),
    "inkling_text": Family("inkling_text", RouterRule("sigmoid", bias_on="scores", weights="joint-shared",
                                                      scale="route_scale*param:global_scale"),
                           "n_routed_experts", shared_expert_attrs=("shared_experts",), shared_count_field="n_shared_experts",
                           selection_bias_paths=("gate.e_score_correction_bias",), router_tail="shared",
                           tail_field="n_shared_experts"),
    "deepseek_v4": Family("deepseek_v4", replace(SIGMOID_BIAS_RENORM, score="config:scoring_func", scale="routed_scaling_factor"),
                          "n_routed_experts", shared_expert_attrs=("shared_experts",),
                          selection_bias_paths=("gate.e_score_correction_bias",), hash_layers=("mlp_layer_types", "hash_moe")),
    "lfm2_moe": Family("lfm2_moe", RouterRule("sigmoid", bias_on="scores", renorm="norm_topk_prob", eps=1e-6,
                                              scale="routed_scaling_factor"),
                       "num_experts", selection_bias_paths=("expert_bias",)),
    # DeepSeek-V3 routing: sigmoid + selection bias, group-limited top-k (group score = sum of the best two)
    **_rows("deepseek_v3 sarvam_mla deepseek_v32 glm4_moe sarvam_moe glm4_moe_lite glm_moe_dsa dots1 dots3_note_text "
            "solar_open hy_v4 axk1 minicpm5_moe param2moe", _DSV3),
    **_rows("kimi_linear bailing_hybrid", replace(_DSV3, count_field="num_experts", top_k_field="num_experts_per_token",
                                                  shared_count_field="num_shared_experts",
                                                  group_fields=("num_expert_group", "topk_group"))),
    "exaone_moe": replace(_DSV3, model_type="exaone_moe", count_field="num_experts", shared_count_field="num_shared_experts"),
    "mimo_v2_flash": replace(_DSV3, model_type="mimo_v2_flash", shared_expert_attrs=(), shared_count_field=None),
    "nemotron_h": replace(_DSV3, model_type="nemotron_h", shared_count_field=None),
    "beam": replace(_DSV3, model_type="beam", rule=replace(DEEPSEEK_V3, scale=None, output_scale="routed_scaling_factor"),
                    count_field="num_experts", shared_expert_attrs=(), shared_count_field=None),
    "axk2": replace(_DSV3, model_type="axk2", rule=replace(DEEPSEEK_V3, group_fill=0.0)),
    "mistral4": replace(_DSV3, model_type="mistral4", rule=RouterRule(
        "softmax", group="top2-sum", group_fill=0.0, renorm="norm_topk_prob", eps=1e-20, scale="routed_scaling_factor"),
        selection_bias_paths=()),
    "deepseek_v2": replace(_DSV3, model_type="deepseek_v2", rule=RouterRule(
        "softmax", group="max", group_fill=0.0, group_if=("topk_method", "group_limited_greedy"),
        scale="routed_scaling_factor"), selection_bias_paths=()),
    "doge": Family("doge", RouterRule(), "num_experts",
                   unsupported="Doge's CDMoE retrieves single-neuron experts from product keys (nn.Embedding rows), "
                               "it has no expert modules to keep or remove"),
}

# Multimodal types whose causal-LM class is the text model of another row.
COMPOSITE = {"dots3_note": "dots3_note_text", "gemma4": "gemma4_text", "llama4": "llama4_text",
             "qwen3_5_moe": "qwen3_5_moe_text", "qwen4_exp": "qwen4_exp_text"}


def family_for(model_type: str) -> Family:
    """The table row, or a generic row (rule to infer by probing; discovery still finds the pieces)."""
    model_type = COMPOSITE.get(model_type, model_type)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return Family(model_type, RouterRule("unknown"), "", top_k_field="", shared_expert_attrs=GENERIC_SHARED_EXPERT_ATTRS,
                  selection_bias_paths=GENERIC_SELECTION_BIAS_PATHS)


def is_known(model_type: str) -> bool:
    return COMPOSITE.get(model_type, model_type) in FAMILIES


__all__ = ["COMPOSITE", "COUNT_ATTRS", "FAMILIES", "Family", "family_for", "is_known"]
