"""``allocopt prune``: export the pruned checkpoint of a plan."""
from __future__ import annotations

from pathlib import Path

import click

from allocopt.cli.options import load_options, loading_options, quiet_option, silence_progress
from allocopt.errors import AllocoptError


@click.command("prune")
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path), help="plan.json written by `allocopt run`.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Directory for the pruned checkpoint.")
@click.option("--model", "model_spec", default=None, help="Checkpoint directory or `testbed` (default: the plan's \"model\").")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@quiet_option
@loading_options
def prune(plan_path: Path, out_dir: Path, model_spec: str | None, overwrite: bool, quiet: bool, **loading) -> None:
    """Remove the experts a plan prunes and write a loadable checkpoint, plan.json and a model card."""
    from allocopt.models import describe, load_model, save_pruned
    from allocopt.models.card import render_card
    from allocopt.plan import Plan

    if quiet:
        silence_progress()
    plan = Plan.load(plan_path)
    spec = model_spec or plan.extra.get("model")
    if not spec:
        raise AllocoptError(f"plan file {plan_path} names no model; pass --model PATH")
    model, tokenizer = load_model(str(spec), load_options(loading))
    before = describe(model)
    plan.validate_for(before, source=f"plan file {plan_path}")
    save_pruned(model, tokenizer, out_dir, plan, card=lambda pruned: render_card(plan, before, pruned, str(spec)),
                overwrite=overwrite, progress=not quiet)         # streams layer by layer if the model was offloaded
    after = describe(model, fingerprint=False)
    click.echo(f"wrote {out_dir}: {sum(after.num_experts.values())}/{sum(before.num_experts.values())} routed experts kept, "
               f"{before.total_bytes / 2**20:.1f} MB -> {after.total_bytes / 2**20:.1f} MB")
