"""``allocopt esap``: score one plan with ESAP (or KL/NLL) against the full model."""
from __future__ import annotations

import json
from pathlib import Path

import click

from allocopt import defaults
from allocopt.cli.options import loading_options, loading_overrides, opt
from allocopt.errors import AllocoptError


@click.command("esap")
@click.option("--model", "model_spec", default=defaults.MODEL, show_default=True, help="Checkpoint directory or `testbed`.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="plan.json to score (masked on --model).")
@click.option("--pruned", "pruned_dir", type=click.Path(path_type=Path),
              help="Or an exported pruned checkpoint to score against --model (the full model it was pruned from).")
@opt("--data", help="Data spec (.txt/.jsonl file, dataset dir, or testbed:NAME) [default: with --plan the data it was "
                     "searched on (plan.json), else the model's own for a shipped testbed (deep:mix for testbed-deep), "
                     f"else {defaults.SEARCH_DATA}].")
@opt("--seq-len", default=defaults.SEARCH_SEQ_LEN, type=int, help="Tokens per row (with --plan: as searched).")
@opt("--num-seqs", default=defaults.SEARCH_SEQS, type=int, help="Rows of the search set (with --plan: as searched).")
@opt("--objective", default=defaults.OBJECTIVE, help="esap, kl_pq, kl_qp or nll.")
@opt("--tolerance", default=defaults.ESAP_TOLERANCE, type=float,
     help="Certified ESAP bound width of the sparse teacher cache (with --plan: as searched).")
@click.option("--exact", is_flag=True, help="Keep the full-vocabulary teacher distribution (bound width 0).")
@click.option("--allow-long-context", is_flag=True, help="Allow --seq-len beyond the model's context (max_position_embeddings).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object as the last line.")
@loading_options
def esap(model_spec: str, plan_path: Path | None, pruned_dir: Path | None, data: str | None, seq_len: int | None,
         num_seqs: int | None, objective: str | None, tolerance: float | None, exact: bool, allow_long_context: bool,
         as_json: bool, **loading) -> None:
    """Teacher-forced agreement of a pruned model with the full model on a fixed token set: a plan's experts
    masked on the full model (--plan; scored on the data, rows and tolerance it was searched with, as plan.json
    records them, unless given), or an exported checkpoint (--pruned)."""
    from allocopt.config import RunConfig
    from allocopt.runtime import load_model
    from allocopt.runtime.loading import open_model, resolve
    from allocopt.pipeline import prepare
    from allocopt.pipeline.run import SCORING_FIELDS
    from allocopt.plan import PLAN_FILE, Plan

    if (plan_path is None) == (pruned_dir is None):
        raise AllocoptError("give exactly one of --plan PLAN.json or --pruned EXPORT_DIR")
    plan = Plan.load(plan_path) if plan_path is not None else None
    if pruned_dir is not None:                   # before the full model loads, in the words of this option
        resolve(pruned_dir, what="--pruned", fix="pass the checkpoint directory that `allocopt prune --out` (or "
                                                 "another pruning tool) wrote")
    given = {"search_data": data, "search_seq_len": seq_len, "search_num_seqs": num_seqs, "objective": objective,
             "tolerance": tolerance}
    recorded = {}                            # as the search scored it, where the plan records it and nothing is given
    if plan is not None:
        recorded = {k: plan.extra.get(k) for k in (*SCORING_FIELDS, "objective") if given[k] is None}
    for layer in (given, recorded):          # one length: the context check reads calibration's too
        if "search_seq_len" in layer:
            layer["seq_len"] = layer.pop("search_seq_len")
    config = RunConfig.from_sources(None, {"model": model_spec, **given, "allow_long_context": allow_long_context,
                                           **loading_overrides(loading)},
                                    recorded=(f"plan file {plan_path}", recorded) if recorded else None)
    data, objective = config.search_data, config.objective
    options = config.load_options()
    source = open_model(config.model, config.trust_remote_code)
    config.check_context(source)
    prepared = prepare(config, search=False, exact=exact, source=source)
    ev = prepared.evaluator
    if plan is not None:
        plan.validate_for(prepared.info, source=f"plan file {plan_path}")
        [v] = ev.evaluate([plan])                 # its bits too, where it has them
    else:
        exported = Path(pruned_dir) / PLAN_FILE      # an allocopt export names the model it was pruned from
        planned = None
        if exported.is_file():
            where = f"the export {pruned_dir} (its {PLAN_FILE})"
            own = Plan.load(exported, source=where, remedy=f"export the plan again with `allocopt prune`, or delete "
                                                           f"{exported} to score the weights alone")
            own.validate_for(prepared.info, source=where)
            planned = {lp.index: len(lp.kept) for lp in own.layers}
        v = ev.score_model(load_model(str(pruned_dir), options)[0], planned)
    if not v.ok:
        raise AllocoptError(f"the pruned model failed on {data}: {v.failed}; check the checkpoint's weights")
    click.echo(f"{objective} {v.value:.6f}  bound [{v.lo:.6f}, {v.hi:.6f}]  over {v.tokens} scored tokens of {data} "
               f"({ev.direction}; teacher cache {ev.teacher.nbytes / 2**20:.2f} MiB, {ev.teacher.mode})")
    if as_json:
        click.echo(json.dumps({"objective": objective, objective: v.value, "bound": [v.lo, v.hi], "tokens": v.tokens,
                               "data": data}))
