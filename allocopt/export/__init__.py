"""Writing pruned checkpoints: compact (each layer its own expert count, ``compact``), streamed one decoder layer at
a time from an offloaded model (``streamed``), exact padding to one count for stock engines (``padded``), the
checkpoint's own modelling code for plain transformers (``remote_code``) and the model card (``card``).

Which loader loads which export:

* compact export (``allocopt prune``): ``allocopt.load_pruned``; vLLM with allocopt installed (its plugin,
  ``allocopt.serving.vllm_plugin``); ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` through
  the modelling code it carries.
* padded export (``allocopt prune --pad``): stock transformers and stock vLLM, no plugin, no remote code.

    save_pruned(model, tokenizer, "out/", plan)        # prunes in place, writes safetensors atomically
"""
from allocopt.export.compact import save_pruned

__all__ = ["save_pruned"]
