"""One exception type for every user-facing failure.

The CLI turns an ``AllocoptError`` into a single line on stderr and exit code 2, so every message must
say what is wrong *and* how to fix it, in one sentence.
"""
from __future__ import annotations


class AllocoptError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""

    exit_code = 2


def json_kind(value: object) -> str:
    """A JSON value's type as a JSON file spells it ("null", "a number", "an array", ...), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
