"""Serving pruned checkpoints: the vLLM plugin (per-layer expert counts), the self-contained export (its own modelling
code for plain transformers), and the exact padded export (one expert count, loads with stock engines).

Which loader loads which export:

* compact export (``allocopt prune``): ``allocopt.load_pruned``; vLLM with allocopt installed (``vllm_plugin``);
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` through the modelling code it carries.
* padded export (``allocopt prune --pad``): stock transformers and stock vLLM, no plugin, no remote code.
"""
