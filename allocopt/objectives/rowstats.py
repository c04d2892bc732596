"""Statistics over search rows: a pooled objective's standard error, and paired differences of two plans.

An objective value is pooled over scored positions, ``value = sum_i s_i / sum_i n_i`` with ``s_i`` the sum of the
per-position terms of row i and ``n_i`` its scored positions. Positions inside a row are correlated (one text), so
rows are the independent units: the standard error is the ratio estimator's, with rows as clusters
(Cochran, *Sampling Techniques*, 3rd ed., §6.4 / §11.7):

    se^2 = r / (r - 1) * sum_i (s_i - value * n_i)^2 / (sum_i n_i)^2

Two plans scored on the same rows are compared through the per-row differences ``d_i = s_i(a) - s_i(b)`` (same
``n_i``), whose pooled mean is ``value(a) - value(b)`` and whose standard error drops the between-row variance both
plans share (a hard row is hard for every plan). Pure numpy, no model: the search layer uses it too.
"""
from __future__ import annotations

import math

import numpy as np


def pooled(sums: np.ndarray, tokens: np.ndarray) -> float:
    """``sum(sums) / sum(tokens)``; NaN when no position is scored. Shapes: [rows], [rows]."""
    total = float(np.sum(tokens))
    return float(np.sum(sums)) / total if total > 0 else math.nan


def cluster_se(sums: np.ndarray, tokens: np.ndarray) -> float:
    """Standard error of :func:`pooled` over rows; NaN with fewer than two rows."""
    sums, tokens = np.asarray(sums, dtype=float), np.asarray(tokens, dtype=float)
    r, total = len(sums), float(tokens.sum())
    if r < 2 or total <= 0:
        return math.nan
    resid = sums - pooled(sums, tokens) * tokens
    return math.sqrt(r / (r - 1) * float((resid ** 2).sum())) / total


def paired(sums_a: np.ndarray, sums_b: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """``value(a) - value(b)`` on the rows both have scored (the first ``min(len)``) and its paired standard error."""
    r = min(len(sums_a), len(sums_b), len(tokens))
    d = np.asarray(sums_a[:r], dtype=float) - np.asarray(sums_b[:r], dtype=float)
    t = np.asarray(tokens[:r], dtype=float)
    return pooled(d, t), cluster_se(d, t)
