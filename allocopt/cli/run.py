"""`allocopt run`: parse options, build a RunConfig, call run_search, print uniform vs best."""
from __future__ import annotations

import json

import click

from allocopt import defaults as D
from allocopt.cli.options import (json_option, loading_options, loading_overrides, model_option, opt, parse_key_values,
                                  quiet_option, seed_option, silence_progress)


@click.command("run")
@opt("--problem", type=click.Path(dir_okay=False), help="Problem file (TOML); command-line options override it.")
@model_option
@opt("--criterion", default=D.CRITERION, help="Within-layer ranking: reap, frequency, ean, seer, man, msan or unified:b=..,alpha=..,beta=..")
@opt("--optimizer", default=D.OPTIMIZER, help="ga, dp, evoesap, cmaes, tpe, nsga2, random, uniform, global or grape.")
@opt("--objective", default=D.OBJECTIVE, help="What the search maximises.")
@opt("--sparsity", type=float, default=D.SPARSITY,
     help="Fraction of routed experts removed overall, rounded to whole experts (plan.json records the effective one; or use --keep).")
@opt("--keep", type=int, help="Total routed experts kept over all layers (instead of --sparsity).")
@opt("--memory", metavar="SIZE",
     help="Budget in bytes instead: the pruned export's tensors take at most SIZE (e.g. 12GiB, 800MB; KB..TB are "
          "powers of 1000, KiB..TiB of 1024), counted by the "
          "code that writes the export (plan.json records the export's bytes).")
@opt("--memory-ratio", type=float, metavar="R", help="The same as a fraction of the unpruned export's bytes (e.g. 0.6).")
@opt("--min-density", type=float, default=D.MIN_DENSITY, help="Fewest experts a layer keeps, as a fraction (top-k is always kept).")
@opt("--max-density", type=float, default=D.MAX_DENSITY, help="Most experts a layer keeps, as a fraction.")
@opt("--count-multiple", type=int, default=D.COUNT_MULTIPLE, metavar="M",
     help="Every layer keeps a multiple of M experts (the server's expert-parallel size, or what its kernel needs); "
          "combined with group-limited routing's own step, every optimizer and baseline searches only such plans.")
@opt("--allowed-counts", metavar="LIST",
     help="The only expert counts a layer may keep, e.g. 64,96,128 (what a serving kernel accepts); every optimizer "
          "and baseline evaluates and returns only such plans, the budget being the nearest total they can reach.")
@opt("--bits", metavar="LIST",
     help="Bit-widths the routed experts may also be stored at, e.g. 8,4 (int weight-only, group-wise, the "
          "compressed-tensors W8A16/W4A16 schemes): each layer's (count, bit-width) is searched under --memory/--memory-ratio.")
@opt("--data", metavar="SPEC",
     help="Data for calibration and search (split calibration/search): testbed:NAME, FILE.txt, FILE.jsonl or a dataset "
          f"dir [default: a shipped testbed's own mix (deep:mix for testbed-deep), else {D.SEARCH_DATA}].")
@opt("--calib-data", metavar="SPEC", help="Calibration data only (overrides --data).")
@opt("--search-data", metavar="SPEC", help="Search (objective) data only (overrides --data).")
@opt("--seq-len", type=int, default=D.SEARCH_SEQ_LEN, help="Tokens per row, calibration and search.")
@opt("--allow-long-context", is_flag=True, help="Allow --seq-len beyond the model's context (max_position_embeddings).")
@opt("--num-seqs", "search_num_seqs", type=int, default=D.SEARCH_SEQS, help="Rows of search data.")
@opt("--calib-num-seqs", type=int, default=D.CALIBRATION_SEQS, help="Rows of calibration data.")
@opt("--evals", type=int, default=D.EVALUATIONS,
     help="Search budget in full-fidelity evaluation equivalents: a plan scored on all search rows costs 1, one that "
          "racing pruned after r of R rows costs r/R (without racing: distinct plans evaluated).")
@opt("--generations", type=int, help="Shorthand for --evals GENERATIONS*POPULATION.")
@opt("--population", type=int, default=D.POPULATION, help="Population size (evolutionary optimizers).")
@seed_option
@opt("--option", "option_pairs", multiple=True, metavar="KEY=VALUE", help="Optimizer option, repeatable (e.g. elites=4).")
@opt("--tolerance", type=float, default=D.ESAP_TOLERANCE, help="Certified bound width of the teacher cache.")
@opt("--storage", metavar="URL", help="Optuna storage URL [default: sqlite:///<studies dir>/<name>.db].")
@opt("--out", type=click.Path(file_okay=False), help=f"Run directory [default: {D.STUDIES_DIR}/<name>/].")
@opt("--name", "run_name", help="Run and study name [default: from the options, e.g. testbed-reap-ga-s50-seed42].")
@opt("--workers", type=int, default=D.WORKERS, help="Evaluating processes, this one included (more join with `allocopt worker`).")
@click.option("--resume", is_flag=True, help="Continue the existing study of this run name; fail if there is none.")
@quiet_option
@json_option
@loading_options
def run(problem, option_pairs, quiet, resume, as_json, **given) -> None:
    """Search how many experts each MoE layer keeps and write plan.json."""
    from allocopt.config import RunConfig
    from allocopt.pipeline import run_search

    if option_pairs:
        given["options"] = parse_key_values(option_pairs)
    if given.get("allowed_counts") is not None:
        from allocopt.plan import check_allowed_counts

        given["allowed_counts"] = list(check_allowed_counts(given["allowed_counts"]))
    if given.get("bits") is not None:
        from allocopt.plan import check_bits

        given["bits"] = list(check_bits(given["bits"]))
    given.update(loading_overrides(given))
    config = RunConfig.from_sources(problem, given)
    if resume:
        from allocopt.search.workers import require_study

        require_study(config.storage_url, config.name)
    if quiet:
        silence_progress()
    try:
        result = run_search(config, progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted: study {config.name!r} keeps every finished evaluation; run the same command again "
                   "to resume", err=True)
        raise SystemExit(130) from None
    s = result.summary
    objective, value, uniform = s["objective"], s["value"], s["uniform_value"]
    click.echo(f"uniform  {objective} {uniform:.6f}")
    label = config.optimizer if result.fixed_allocation else "best"    # a fixed allocation (grape, global) searched nothing
    raced = f" + {s['pruned']} pruned by racing = {s['evaluation_equivalents']:g} equivalents" if s.get("pruned") else ""
    reused = s.get("from_study", 0)
    earlier = f", {reused} of them from the study" if reused > 0 else ""
    took = (f"{s['wall_time_s']:.1f} s over all calls, {s['wall_time_call_s']:.1f} s this one"
            if s["wall_time_s"] > s["wall_time_call_s"] else f"{s['wall_time_s']:.1f} s")
    click.echo(f"{label:<8} {objective} {value:.6f}  ({value - uniform:+.6f}, "
               f"{s['evaluations']} evaluations{earlier}{raced}, {took})")
    if s.get("racing") not in (None, "on"):
        click.echo(f"racing   {s['racing']}")
    click.echo(f"counts   {s['counts']}")
    if s.get("bits"):
        click.echo(f"bits     {[b or 'source' for b in s['bits']]}")
    if config.sparsity is not None and abs(s["sparsity"] - config.sparsity) > 1e-9:     # whole experts only
        total = result.total_experts
        click.echo(f"sparsity {s['sparsity']:.4f}  (requested {config.sparsity:g}; {total - sum(s['counts'])} of {total} "
                   "routed experts removed)")
    if "export_bytes" in s:                            # a budget in bytes: what the export will weigh
        click.echo(f"memory   {s['export_bytes'] / 2**20:.2f} MiB of export, budget {s['memory_budget_bytes'] / 2**20:.2f} "
                   f"MiB (unpruned {s['full_export_bytes'] / 2**20:.2f} MiB; sparsity {s['sparsity']:.4f})")
    click.echo(f"plan     {result.plan_path}")
    if as_json:
        click.echo(json.dumps(s))
