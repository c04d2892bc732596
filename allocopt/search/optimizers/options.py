"""Typed optimizer options: one frozen dataclass per optimizer, parsed once from ``--option key=value`` or a
problem file's ``[options]`` table.

Each field's type says what a value must be (``int``, ``float``, ``bool``, ``str``, ``X | None``, a tuple of them),
its default comes from ``allocopt.defaults`` and ``option()`` declares the values it accepts::

    @dataclass(frozen=True)
    class Options:
        elites: int = option(defaults.GA_ELITES, at_least=2)
        restart: str = option(defaults.GA_RESTART, choices=("step", "dp"))

    parse_options(Options, {"elites": "6"}, "ga")    # Options(elites=6, restart='step')

Values arrive as text (the command line when TOML cannot read them) or TOML-typed (a problem file); a key the
dataclass lacks or a value it cannot take is one AllocoptError line naming the key and a value that works.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

from allocopt.errors import AllocoptError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_KINDS = {int: "an int", float: "a float", bool: "a bool", str: "a string"}
_EXAMPLES = {int: 4, float: 0.5, bool: True, str: "name"}     # a value of the kind, for options without a default


def option(default: Any, *, at_least: float | None = None, at_most: float | None = None,
           choices: tuple | None = None) -> Any:
    """A field of an ``Options`` dataclass: its default and the values it accepts (bounds apply to each element of
    a tuple)."""
    return dataclasses.field(default=default, metadata={"at_least": at_least, "at_most": at_most, "choices": choices})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of an optimizer that takes none."""


def check_options_class(cls: type) -> None:
    """``cls`` is a frozen dataclass whose every field has a default and a type ``parse_options`` reads
    (TypeError otherwise: a mistake in the optimizer, not in the user's input)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{cls!r} is not a frozen dataclass; declare it with @dataclass(frozen=True)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"option {f.name!r} of {cls.__qualname__} has no default; give it one from allocopt.defaults")
        _shape(hints[f.name], f"option {f.name!r} of {cls.__qualname__}")


def parse_options(cls: type, raw: Mapping[str, Any] | None, optimizer: str) -> Any:
    """``raw`` (key -> text or TOML value; None or a missing key: the default) as an instance of the ``Options``
    dataclass ``cls`` of ``optimizer``; one-line AllocoptError for an unknown key or a value of the wrong kind."""
    raw = raw or {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise AllocoptError(_unknown(key, optimizer, names))
    hints = typing.get_type_hints(cls)
    given = {f.name: _parse(f, hints[f.name], raw[f.name]) for f in dataclasses.fields(cls)
             if raw.get(f.name) is not None}
    return cls(**given)


def _unknown(key: str, optimizer: str, names: list[str]) -> str:
    if not names:
        return f"optimizer {optimizer!r} takes no options; remove --option {key}"
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"--option {key} is not an option of optimizer {optimizer!r}; {hint}its options: {', '.join(sorted(names))}"


def _shape(hint: Any, what: str) -> tuple[type, bool, int | None]:
    """A field's type -> (scalar kind, None allowed, tuple length or None for a scalar)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0] if len(args) == 1 else hint
    length = None
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not args or len(set(args)) != 1 or Ellipsis in args:
            raise TypeError(f"{what} is a tuple of mixed or unknown length; use tuple[float, float] and the like")
        hint, length = args[0], len(args)
    if hint not in _KINDS:
        raise TypeError(f"{what} has type {hint!r}; use int, float, bool, str, X | None or a tuple of one of them")
    return hint, optional, length


def _parse(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    kind, _, length = _shape(hint, f.name)
    try:
        if length is None:
            out = _scalar(value, kind)
        else:
            items = value.strip().strip("[]()").split(",") if isinstance(value, str) else value
            if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__len__") or len(items) != length:
                raise ValueError(value)
            out = tuple(_scalar(v, kind) for v in items)
    except (TypeError, ValueError):
        what = _KINDS[kind] if length is None else f"a list of {length} {kind.__name__}s"
        raise AllocoptError(f"--option {f.name}={value!r} is not {what}; e.g. --option {f.name}={_example(f, kind, length)}"
                            ) from None
    low, high, choices = f.metadata.get("at_least"), f.metadata.get("at_most"), f.metadata.get("choices")
    for v in (out if length else (out,)):
        if low is not None and v < low:
            raise AllocoptError(f"--option {f.name}={_text(out)} must be >= {low}; raise it")
        if high is not None and v > high:
            raise AllocoptError(f"--option {f.name}={_text(out)} must be <= {high}; lower it")
    if choices is not None and out not in choices:
        raise AllocoptError(f"--option {f.name}={value!r} must be one of {', '.join(map(str, choices))}")
    return out


def _scalar(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, read from text where it is a string; ValueError when it is not one."""
    if kind is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE + _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
        raise ValueError(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    if isinstance(value, bool):                  # true is not a number, though Python says 1
        raise TypeError(value)
    if kind is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        return int(str(value).strip())
    out = float(value if isinstance(value, numbers.Real) else str(value).strip())
    if not math.isfinite(out):
        raise ValueError(value)
    return out


def _example(f: dataclasses.Field, kind: type, length: int | None) -> str:
    """A value of ``f`` that parses: its default, else one of its kind within its bounds, as it is typed."""
    if f.metadata.get("choices"):
        return _text(f.metadata["choices"][0])
    if f.default is not None:
        return _text(f.default)
    value = _EXAMPLES[kind]
    low, high = f.metadata.get("at_least"), f.metadata.get("at_most")
    value = kind(max(value, low)) if low is not None and kind in (int, float) else value
    value = kind(min(value, high)) if high is not None and kind in (int, float) else value
    return _text(value if length is None else (value,) * length)


def _text(value: Any) -> str:
    """``value`` as ``--option key=...`` takes it (TOML: true, [0.25,0.75])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)
