"""Running a model, whatever its size: loading options and accelerate placement (``loading``), offloaded weights
read straight from safetensors (``offload``), one decoder layer at a time (``decoder``), an offloaded layer's
experts a slice at a time (``expert_slices``), and the context-length check every command makes before it feeds
rows (``context``).

    model, tokenizer = load_model("./OLMoE-1B-7B", LoadOptions(max_memory={"cpu": "600MiB"}, offload_dir="/tmp/off"))
"""
from allocopt.runtime.loading import LoadOptions, ModelSource, load_model, open_model

__all__ = ["LoadOptions", "ModelSource", "load_model", "open_model"]
