"""Click options shared by commands. Defaults live in allocopt.defaults; an option left out is passed as None so
that a problem file (or the library) decides, and --help still shows the effective default."""
from __future__ import annotations

import tomllib
from typing import Any, Callable

import click

from allocopt import defaults as D
from allocopt.errors import AllocoptError


def opt(*decls: str, default: Any = None, **kwargs: Any) -> Callable:
    """A click option whose value is None when not given; ``default`` is only what --help shows."""
    if default is not None:
        kwargs["help"] = f"{kwargs.get('help', '')}  [default: {default}]".strip()
    return click.option(*decls, default=None, **kwargs)


model_option = opt("--model", default=D.MODEL, metavar="DIR|testbed",
                   help="Local checkpoint directory, or `testbed` for the shipped model.")
trust_remote_code_option = click.option("--trust-remote-code", is_flag=True, default=None,
                                        help="Allow the checkpoint's own Python code (off unless asked for).")
seed_option = opt("--seed", type=int, default=D.SEED, help="Random seed.")
json_option = click.option("--json", "as_json", is_flag=True, help="Make the last printed line a JSON summary.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars or notes (stderr then holds only warnings and errors).")


def silence_progress() -> None:
    """Turn off transformers' own progress bars (loading and writing shards) for the rest of the process, and
    allocopt's notes (warnings still print)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("allocopt").setLevel(logging.WARNING)


def parse_key_values(pairs: tuple[str, ...], what: str = "--option") -> dict[str, Any]:
    """``("elites=4", "name=x")`` -> ``{"elites": 4, "name": "x"}``; values are read as TOML, else as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise AllocoptError(f"{what} {pair!r} is not KEY=VALUE; write e.g. {what} elites=4")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip()] = value
    return out
