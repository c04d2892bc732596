"""``allocopt eval``: the testbed's held-out tasks, or lm-evaluation-harness tasks, on any checkpoint (the testbed
itself or a pruned export)."""
from __future__ import annotations

import json
import time

import click

from allocopt import defaults
from allocopt.cli.options import load_options, loading_options
from allocopt.config import shipped_corpus
from allocopt.errors import AllocoptError


@click.command("eval")
@click.option("--model", "model_spec", default=defaults.MODEL, show_default=True, help="Checkpoint directory or `testbed`.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Evaluate the model with this plan's pruned experts masked out (what the search scored).")
@click.option("--json", "as_json", is_flag=True, help="Also print the metrics as one JSON object (last line).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the metrics JSON to this file.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N items (or sequences) per task.")
@click.option("--lm-eval-tasks", "lm_eval_tasks", metavar="NAME[,NAME]", default=None,
              help="Run these lm-evaluation-harness tasks (names or globs) instead of the testbed tasks; "
                   'needs pip install "allocopt[lm-eval]".')
@click.option("--lm-eval-include", "lm_eval_include", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of your own lm-eval task YAML files (searched before lm-eval's built-in tasks).")
@click.option("--allow-long-context", is_flag=True,
              help="Evaluate even when the testbed tasks' perplexity windows are longer than the model's context.")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="Engine: vllm runs the open-ended tasks (math and code exact match, or lm-eval's vllm model) "
                   "through vLLM, where it is installed (bash .ci/vllm-venv); it takes --dtype and --trust-remote-code, "
                   "not accelerate's --device-map, --max-memory or --offload-dir.")
@click.option("--tasks-from", "corpus", type=click.Choice(["testbed", "deep"]), default=None,
              help="Whose held-out split the testbed tasks use: the first testbed's corpus, or the deep testbed's "
                   "(the default for --model testbed-deep and the checkpoints pruned from it).")
@loading_options
def evaluate(model_spec: str, plan_path: str | None, as_json: bool, out: str | None, limit: int | None, lm_eval_tasks: str | None,
             lm_eval_include: str | None, allow_long_context: bool, backend: str, corpus: str | None, **loading) -> None:
    """Held-out perplexity per domain, math and code exact match, and multiple-choice accuracy, or lm-eval tasks."""
    from allocopt.io import atomic_write_json

    if plan_path is not None and lm_eval_tasks is not None:
        raise AllocoptError("--plan works with the testbed tasks only; export the plan with `allocopt prune` for lm-eval")
    if plan_path is not None and backend == "vllm":
        raise AllocoptError("--plan masks experts inside transformers; export the plan with `allocopt prune` and pass "
                            "the export as --model to evaluate it with --backend vllm")
    if lm_eval_include is not None and lm_eval_tasks is None:
        raise AllocoptError("--lm-eval-include needs --lm-eval-tasks; name the tasks to run from that folder")
    options = load_options(loading)
    corpus = corpus or shipped_corpus(model_spec) or "testbed"
    if backend == "vllm":                   # an option vLLM cannot honour is refused before anything loads
        from allocopt.serving.vllm_engine import engine_kwargs

        engine_kwargs(options)
    if lm_eval_tasks is not None:
        metrics = _lm_eval(model_spec, lm_eval_tasks, lm_eval_include, limit, backend, options)
    elif backend == "vllm":
        metrics = _vllm_generation_tasks(model_spec, limit, options, corpus)
    else:
        metrics = _testbed_tasks(model_spec, limit, plan_path, allow_long_context, options, corpus)
    if out:
        atomic_write_json(out, metrics)
    if as_json:
        click.echo(json.dumps(metrics))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lm_eval(model_spec: str, tasks: str, include: str | None, limit: int | None, backend: str, options=None) -> dict:
    from allocopt.evaluation.lm_eval_adapter import metric_table, run_lm_eval

    start = time.time()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    results = run_lm_eval(model_spec, names, include_path=include, limit=limit, backend=backend, options=options)
    table = metric_table(results)
    click.echo(f"{'metric':<32} {'value':>10}")
    for name, value in table.items():
        click.echo(f"{name:<32} {value:>10.4f}")
    seconds = round(time.time() - start, 1)
    click.echo(f"({seconds:.1f} s)")
    metrics = {"lm_eval": table, "model": str(model_spec), "backend": backend, "seconds": seconds}
    dtype = results.get("config", {}).get("model_dtype")      # what lm-eval's HFLM ran (its own report)
    if dtype:
        metrics["model_dtype"] = _dtype_name(dtype)
    return metrics


def _vllm_generation_tasks(model_spec: str, limit: int | None, options=None, corpus: str = "testbed") -> dict:
    """Math and code exact match with vLLM generating (the checkpoint's own tokenizer tokenises, as in transformers)."""
    import transformers

    from allocopt.evaluation.harness import generation_metrics
    from allocopt.runtime.loading import resolve
    from allocopt.serving.vllm_engine import VllmGenerator, vllm_platform

    vllm_platform()                                      # vLLM's install hint before anything loads
    path = resolve(model_spec)
    trust = bool(options is not None and options.trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    generator = VllmGenerator(path, options)
    metrics = generation_metrics(generator, tokenizer, limit, corpus)
    metrics.update(model=str(model_spec), backend="vllm")
    dtype = getattr(getattr(getattr(generator.llm, "llm_engine", None), "model_config", None), "dtype", None)
    if dtype is not None:                                   # what vLLM computes in (its model config)
        metrics["model_dtype"] = _dtype_name(dtype)
    click.echo(f"{'metric':<20} {'value':>10}")
    click.echo(f"{'math_em':<20} {metrics['math_em']:>10.3f}")
    for form, value in metrics["math_em_by_form"].items():
        click.echo(f"{'math_em/' + form:<20} {value:>10.3f}")
    click.echo(f"{'code_em':<20} {metrics['code_em']:>10.3f}")
    click.echo(f"{'code_edit_sim':<20} {metrics['code_edit_sim']:>10.3f}")
    click.echo(f"({metrics['seconds']:.1f} s)")
    return metrics


def _testbed_tasks(model_spec: str, limit: int | None, plan_path: str | None = None, allow_long_context: bool = False,
                   options=None, corpus: str = "testbed") -> dict:
    import contextlib

    from allocopt.runtime.context import check_context
    from allocopt.evaluation import evaluate as run_evaluation
    from allocopt.evaluation.harness import PPL_SEQ_LEN
    from allocopt.models import describe
    from allocopt.models.quantization import apply_plan
    from allocopt.runtime import load_model
    from allocopt.plan import Plan

    check_context(model_spec, PPL_SEQ_LEN, "the testbed tasks' perplexity window", allow_long_context,
                  trust_remote_code=bool(options is not None and options.trust_remote_code), settable=False)
    model, tokenizer = load_model(model_spec, options)
    if tokenizer is None:
        raise AllocoptError(f"model {model_spec} has no tokenizer files; save the tokenizer into the checkpoint directory")
    masking = contextlib.nullcontext()
    if plan_path is not None:
        plan = Plan.load(plan_path).validate_for(describe(model), source=f"plan file {plan_path}")
        masking = apply_plan(model, plan)            # masked experts, and quantized ones where the plan has bits
    with masking:
        metrics = run_evaluation(model, tokenizer, limit=limit, corpus=corpus)
    metrics["model"] = str(model_spec)
    metrics["model_dtype"] = _dtype_name(model.dtype)
    if plan_path is not None:
        metrics["plan"] = str(plan_path)
    click.echo(f"{'metric':<20} {'value':>10}")
    for domain, value in metrics["ppl"].items():
        click.echo(f"{'ppl/' + domain:<20} {value:>10.3f}")
    click.echo(f"{'math_em':<20} {metrics['math_em']:>10.3f}")
    for form, value in metrics["math_em_by_form"].items():
        click.echo(f"{'math_em/' + form:<20} {value:>10.3f}")
    click.echo(f"{'code_em':<20} {metrics['code_em']:>10.3f}")
    click.echo(f"{'code_edit_sim':<20} {metrics['code_edit_sim']:>10.3f}")
    click.echo(f"{'mc_acc':<20} {metrics['mc_acc']:>10.3f}")
    for domain, value in metrics["mc_acc_by_domain"].items():
        click.echo(f"{'mc_acc/' + domain:<20} {value:>10.3f}")
    click.echo(f"({metrics['seconds']:.1f} s)")
    return metrics
