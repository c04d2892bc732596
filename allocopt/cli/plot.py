"""``allocopt plot pareto|density|convergence``: parse, call allocopt.plotting, print the written paths.

``plots/*.py`` run these same commands through :func:`run_script`, so the scripts and the CLI share one parser.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from allocopt.errors import AllocoptError

_storage = click.option("--storage", default=None, metavar="URL", help="Optuna storage URL (e.g. sqlite:///studies/run.db).")
_study = click.option("--study", "study_name", default=None, metavar="NAME", help="Study name inside the storage.")
_out = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                    help="Output directory [default: <run dir>/plots, or studies/plots].")


def _report(paths: dict[str, Path]) -> None:
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@click.group()
def plot() -> None:
    """Draw Pareto, density or convergence plots (PNG plus the data behind them as CSV/JSON)."""


@plot.command()
@click.argument("target", required=False)
@_storage
@_study
@_out
@click.option("--ref-memory-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Hypervolume reference memory [default: unpruned expert memory, from the run's plan.json].")
def pareto(target: str | None, storage: str | None, study_name: str | None, out: Path | None,
           ref_memory_gb: float | None) -> None:
    """ESAP vs expert memory front of an nsga2 run (TARGET: run dir, .db file or storage URL)."""
    from allocopt.plotting import plot_pareto

    _report(plot_pareto([target] if target else [], out, storage, study_name, ref_memory_gb))


@plot.command()
@click.argument("plans", nargs=-1, required=True)
@_out
def density(plans: tuple[str, ...], out: Path | None) -> None:
    """Kept-expert density per decoder layer of one or more plans (PLANS: plan.json files or run dirs)."""
    from allocopt.plotting import plot_density

    _report(plot_density(plans, out))


@plot.command()
@click.argument("targets", nargs=-1)
@_storage
@_study
@_out
@click.option("--x", "axis", type=click.Choice(["evaluations", "tokens", "seconds"]), default="evaluations",
              show_default=True, help="x axis: full-fidelity evaluation equivalents, decoder layer-tokens forwarded, "
              "or wall-clock seconds.")
def convergence(targets: tuple[str, ...], storage: str | None, study_name: str | None, out: Path | None,
                axis: str) -> None:
    """Best ESAP so far vs search cost, one line per optimizer (TARGETS: run dirs, .db files, storage URLs)."""
    from allocopt.plotting import plot_convergence

    _report(plot_convergence(targets, out, storage, study_name, x=axis))


def run_script(kind: str) -> None:
    """Entry point of ``plots/<kind>.py``: the same command, with AllocoptError as one line and exit 2."""
    try:
        plot.commands[kind].main(prog_name=f"plots/{kind}.py", standalone_mode=True)
    except AllocoptError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
