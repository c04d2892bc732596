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

# Where and how a model loads: the same options on every command that loads one (allocopt.runtime.LoadOptions).
_LOADING = (
    opt("--device", default=D.DEVICE, help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ..."),
    opt("--dtype", help="Load the weights in this dtype (default: the checkpoint's), e.g. bfloat16."),
    opt("--device-map", type=click.Choice(["auto"]), help="Let accelerate place layers over GPUs, CPU and disk."),
    opt("--max-memory", "max_memory_pairs", multiple=True, metavar="DEVICE=SIZE",
        help="Memory a device may hold (repeatable), e.g. --max-memory cuda:0=70GiB --max-memory cpu=200GiB; implies "
             "--device-map auto."),
    opt("--offload-dir", type=click.Path(file_okay=False), help="Folder for weights beyond --max-memory (disk offload)."),
    trust_remote_code_option,
)


def loading_options(command: Callable) -> Callable:
    """Add the loading options to a command; :func:`load_options` turns them into a LoadOptions."""
    for decorator in reversed(_LOADING):
        command = decorator(command)
    return command


def loading_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """Pop the loading options from a command's keyword arguments -> the ``RunConfig`` keys they set (None: not
    given), so every command turns them into settings the same way."""
    from allocopt.config import check_dtype

    out = {key: given.pop(key, None) for key in ("device", "dtype", "device_map", "offload_dir", "trust_remote_code")}
    out["max_memory"] = memory_limits(given.pop("max_memory_pairs", ()) or ()) or None
    if out["dtype"]:
        check_dtype(out["dtype"])
    return out


def load_options(given: dict[str, Any]):
    """Pop the loading options from a command's keyword arguments -> ``allocopt.runtime.LoadOptions``."""
    from allocopt.runtime.loading import LoadOptions

    return LoadOptions().with_(**{k: v for k, v in loading_overrides(given).items() if v not in (None, {})})


def memory_limits(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("cuda:0=70GiB", "cpu=600MiB")`` -> ``{"cuda:0": "70GiB", "cpu": "600MiB"}`` (checked when loading)."""
    out = {}
    for pair in pairs:
        device, eq, size = pair.partition("=")
        if not eq or not device.strip() or not size.strip():
            raise AllocoptError(f"--max-memory {pair!r} is not DEVICE=SIZE; write e.g. --max-memory cpu=600MiB")
        out[device.strip()] = size.strip()
    return out
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
