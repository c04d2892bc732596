"""One exception type for every user-facing failure.

The CLI turns an ``AllocoptError`` into a single line on stderr and exit code 2, so every message must
say what is wrong *and* how to fix it, in one sentence.
"""
from __future__ import annotations


class AllocoptError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""

    exit_code = 2
