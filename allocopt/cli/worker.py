"""``allocopt worker``: evaluate plans of a running search from another process or machine.

    allocopt run --storage postgresql://host/db --name big-run ...      # the coordinator
    allocopt worker --study big-run --storage postgresql://host/db      # as many of these as you like
"""
from __future__ import annotations

import click

from allocopt.cli.options import loading_options, loading_overrides


@click.command("worker")
@click.option("--study", "study_name", required=True, help="Study (run) name of the search to join.")
@click.option("--storage", required=True, metavar="URL", help="Optuna storage URL of that search (e.g. postgresql://...).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Plans taken and evaluated together in one batched pass (more: faster per plan, less sharing).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Exit after this many seconds without work [default: wait until the search is done].")
@click.option("--exit-with-parent", type=int, default=None, hidden=True,
              help="Exit when the process with this id (the coordinator that started us) is gone.")
@loading_options
def worker(study_name: str, storage: str, batch: int, idle_timeout: float | None, exit_with_parent: int | None,
           **loading) -> None:
    """Take WAITING trials of a study, evaluate them and record the results, until the search is done. Loading
    options left out are the coordinator's."""
    from allocopt.pipeline.worker import serve

    done = serve(storage, study_name, batch=batch, idle_timeout=idle_timeout, parent=exit_with_parent,
                 loading=loading_overrides(loading))
    click.echo(f"worker evaluated {done} plans of study {study_name}")
