"""``allocopt esap``: score one plan with ESAP (or KL/NLL) against the full model."""
from __future__ import annotations

import json
from pathlib import Path

import click

from allocopt import defaults
from allocopt.cli.options import loading_options, loading_overrides
from allocopt.errors import AllocoptError


@click.command("esap")
@click.option("--model", "model_spec", default=defaults.MODEL, show_default=True, help="Checkpoint directory or `testbed`.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="plan.json to score (masked on --model).")
@click.option("--pruned", "pruned_dir", type=click.Path(path_type=Path),
              help="Or an exported pruned checkpoint to score against --model (the full model it was pruned from).")
@click.option("--data", default=defaults.SEARCH_DATA, show_default=True, help="Data spec (.txt/.jsonl file, dataset dir, or testbed:NAME).")
@click.option("--seq-len", default=defaults.SEARCH_SEQ_LEN, show_default=True, type=int, help="Tokens per row.")
@click.option("--num-seqs", default=defaults.SEARCH_SEQS, show_default=True, type=int, help="Rows of the search set.")
@click.option("--objective", default=defaults.OBJECTIVE, show_default=True, help="esap, kl_pq, kl_qp or nll.")
@click.option("--tolerance", default=defaults.ESAP_TOLERANCE, show_default=True, type=float, help="Certified ESAP bound width of the sparse teacher cache.")
@click.option("--exact", is_flag=True, help="Keep the full-vocabulary teacher distribution (bound width 0).")
@click.option("--allow-long-context", is_flag=True, help="Allow --seq-len beyond the model's context (max_position_embeddings).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object as the last line.")
@loading_options
def esap(model_spec: str, plan_path: Path | None, pruned_dir: Path | None, data: str, seq_len: int, num_seqs: int,
         objective: str, tolerance: float, exact: bool, allow_long_context: bool, as_json: bool, **loading) -> None:
    """Teacher-forced agreement of a pruned model with the full model on a fixed token set: a plan's experts
    masked on the full model (--plan), or an exported checkpoint (--pruned)."""
    from allocopt.config import RunConfig
    from allocopt.runtime import load_model
    from allocopt.runtime.loading import open_model
    from allocopt.pipeline import prepare
    from allocopt.plan import Plan

    if (plan_path is None) == (pruned_dir is None):
        raise AllocoptError("give exactly one of --plan PLAN.json or --pruned EXPORT_DIR")
    plan = Plan.load(plan_path) if plan_path is not None else None
    config = RunConfig.from_sources(None, {
        "model": model_spec, "search_data": data, "seq_len": seq_len, "search_num_seqs": num_seqs,
        "objective": objective, "tolerance": tolerance, "allow_long_context": allow_long_context,
        **loading_overrides(loading)})
    options = config.load_options()
    source = open_model(config.model, config.trust_remote_code)
    config.check_context(source)
    prepared = prepare(config, search=False, exact=exact, source=source)
    ev = prepared.evaluator
    if plan is not None:
        plan.validate_for(prepared.info, source=f"plan file {plan_path}")
        [v] = ev.evaluate([plan])                 # its bits too, where it has them
    else:
        v = ev.score_model(load_model(str(pruned_dir), options)[0])
    if not v.ok:
        raise AllocoptError(f"the pruned model failed on {data}: {v.failed}; check the checkpoint's weights")
    click.echo(f"{objective} {v.value:.6f}  bound [{v.lo:.6f}, {v.hi:.6f}]  over {v.tokens} scored tokens "
               f"({ev.direction}; teacher cache {ev.teacher.nbytes / 2**20:.2f} MB, {ev.teacher.mode})")
    if as_json:
        click.echo(json.dumps({"objective": objective, objective: v.value, "bound": [v.lo, v.hi], "tokens": v.tokens}))
