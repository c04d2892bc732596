"""The one rule for the teacher's tolerance: the width of the certified bound [lo, hi] around each ESAP value.

Torch-free, so the run configuration checks it before any weights load and ``build_teacher`` checks it again for
library callers, with the same words.
"""
from __future__ import annotations

import numbers

from allocopt import defaults
from allocopt.errors import AllocoptError


def check_tolerance(width: float, name: str = "ESAP tolerance") -> None:
    """Raise AllocoptError unless ``width`` lies in [0, ``defaults.MAX_ESAP_TOLERANCE``]: a wider bound cannot tell
    plans apart (the search compares values that differ by about 1e-3). ``name`` is what the message calls it
    (``--tolerance`` on the command line)."""
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise AllocoptError(f"{name} must be a number, got {type(width).__name__} {width!r}; use e.g. "
                            f"{defaults.ESAP_TOLERANCE:g}, or 0 for exact")
    if not 0 <= width <= defaults.MAX_ESAP_TOLERANCE:           # repr: 0.10000001 must not print as 0.1
        raise AllocoptError(f"{name} {float(width)!r} is not a bound width in [0, {defaults.MAX_ESAP_TOLERANCE:g}] (a "
                            f"wider bound cannot tell plans apart); use e.g. {defaults.ESAP_TOLERANCE:g}, or 0 for exact")
