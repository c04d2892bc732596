"""Entry point ``allocopt``. Subcommands are imported lazily so ``allocopt --help`` stays fast."""
from __future__ import annotations

import importlib
import logging
import sys

import click

from allocopt.errors import AllocoptError

# name -> ("module:attribute" of a click.Command, one-line summary shown by --help without importing it)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("allocopt.cli.info:info", "Describe a model's MoE layers (experts, top-k, router rule)."),
    "observe": ("allocopt.cli.observe:observe", "Collect routing statistics on calibration data."),
    "prune": ("allocopt.cli.prune:prune", "Export the pruned checkpoint of a plan."),
    "eval": ("allocopt.cli.evaluate:evaluate", "Evaluate a model on the testbed tasks."),
    "esap": ("allocopt.cli.esap:esap", "Score a plan with ESAP (or another objective)."),
    "run": ("allocopt.cli.run:run", "Search the per-layer allocation and write plan.json."),
    "worker": ("allocopt.cli.worker:worker", "Join a running search as an extra worker."),
    "plot": ("allocopt.cli.plot:plot", "Draw Pareto, density or convergence plots."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])

    def invoke(self, ctx: click.Context):
        _log_to_stderr()
        try:
            return super().invoke(ctx)
        except AllocoptError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:             # outputs are written atomically: nothing half-written stays behind
            click.echo(f"interrupted: allocopt {ctx.invoked_subcommand or ''} stopped".rstrip(), err=True)
            sys.exit(130)


class _StderrLines(logging.Handler):
    """The library's notes and warnings as ``note: ...`` / ``warning: ...`` lines on stderr, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        label = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        click.echo(f"{label}: {record.getMessage()}", err=True)


def _log_to_stderr() -> None:
    """Route the ``allocopt`` logger to stderr for this command (``--quiet`` raises the level to warnings)."""
    logger = logging.getLogger("allocopt")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
    logger.setLevel(logging.INFO)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allocopt")
def cli() -> None:
    """allocopt: decide how many experts each MoE layer keeps when a model is pruned."""


if __name__ == "__main__":
    cli()
