"""The one rule for the teacher's tolerance: the width of the certified bound [lo, hi] around each ESAP value.

Torch-free, so the run configuration checks it before any weights load and ``build_teacher`` checks it again for
library callers, with the same words.
"""
from __future__ import annotations

from allocopt import defaults
from allocopt.errors import AllocoptError


def check_tolerance(width: float, name: str = "ESAP tolerance") -> None:
    """Raise AllocoptError unless ``width`` lies in [0, ``defaults.MAX_ESAP_TOLERANCE``]: a wider bound cannot tell
    plans apart (the search compares values that differ by about 1e-3). ``name`` is what the message calls it
    (``--tolerance`` on the command line)."""
    if not 0 <= width <= defaults.MAX_ESAP_TOLERANCE:
        raise AllocoptError(f"{name} {width:g} is not a bound width in [0, {defaults.MAX_ESAP_TOLERANCE:g}] (a wider "
                            f"bound cannot tell plans apart); use e.g. {defaults.ESAP_TOLERANCE:g}, or 0 for exact")
