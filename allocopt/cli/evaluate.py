"""``allocopt eval``: the testbed's held-out tasks on any checkpoint (the testbed itself or a pruned export)."""
from __future__ import annotations

import json

import click

from allocopt import defaults
from allocopt.errors import AllocoptError


@click.command("eval")
@click.option("--model", "model_spec", default=defaults.MODEL, show_default=True, help="Checkpoint directory or `testbed`.")
@click.option("--json", "as_json", is_flag=True, help="Also print the metrics as one JSON object (last line).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the metrics JSON to this file.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N items (or sequences) per task.")
def evaluate(model_spec: str, as_json: bool, out: str | None, limit: int | None) -> None:
    """Held-out perplexity per domain, math and code exact match, and multiple-choice accuracy."""
    from allocopt.evaluation import evaluate as run_evaluation
    from allocopt.io import atomic_write_json
    from allocopt.models import load_model

    model, tokenizer = load_model(model_spec)
    if tokenizer is None:
        raise AllocoptError(f"model {model_spec} has no tokenizer files; save the tokenizer into the checkpoint directory")
    metrics = run_evaluation(model, tokenizer, limit=limit)
    metrics["model"] = str(model_spec)
    click.echo(f"{'metric':<20} {'value':>10}")
    for domain, value in metrics["ppl"].items():
        click.echo(f"{'ppl/' + domain:<20} {value:>10.3f}")
    click.echo(f"{'math_em':<20} {metrics['math_em']:>10.3f}")
    for form, value in metrics["math_em_by_form"].items():
        click.echo(f"{'math_em/' + form:<20} {value:>10.3f}")
    click.echo(f"{'code_em':<20} {metrics['code_em']:>10.3f}")
    click.echo(f"{'mc_acc':<20} {metrics['mc_acc']:>10.3f}")
    for domain, value in metrics["mc_acc_by_domain"].items():
        click.echo(f"{'mc_acc/' + domain:<20} {value:>10.3f}")
    click.echo(f"({metrics['seconds']:.1f} s)")
    if out:
        atomic_write_json(out, metrics)
    if as_json:
        click.echo(json.dumps(metrics))
