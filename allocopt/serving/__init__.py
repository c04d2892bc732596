"""Serving runtimes for pruned checkpoints: the vLLM plugin that builds per-layer expert counts (``vllm_plugin``,
``vllm_models``) and the vLLM engine used by ``allocopt eval --backend vllm`` (``vllm_engine``). Writing the
checkpoints they load is ``allocopt.export``.
"""
