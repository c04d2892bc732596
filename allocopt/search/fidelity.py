"""Multi-fidelity scoring as optimizers see it: a plan's objective on the first r search rows.

The engine scores nested subsets (the first r rows of the search set) and keeps per-row sums, so a plan raised
from r to r' rows only runs the rows it has not scored. A :class:`Score` is signed like every value an optimizer
sees (higher is better) and carries its row-clustered standard error; :meth:`Score.paired` compares two plans on
the same rows (``allocopt.objectives.rowstats``). The runner provides a :class:`Fidelity` when the search runs in
one process; the study records each raced-out plan as a PRUNED trial with its partial values by row count.

    scores = ctx.fidelity.score(X, rows=4)          # first 4 of ctx.fidelity.rows rows; [n] Score
    diff, se = scores[0].paired(incumbent)           # per-row differences on the same 4 rows
    ctx.fidelity.prune(X[1:])                        # raced out: PRUNED trials
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from allocopt.errors import AllocoptError
from allocopt.objectives.rowstats import cluster_se, paired, pooled


@dataclass(frozen=True)
class Score:
    """Signed objective of one plan on its first ``rows`` rows; ``value`` is NaN when the plan failed."""

    rows: int
    row_sums: np.ndarray          # [rows] per-row sums of the signed per-position values
    row_tokens: np.ndarray        # [rows] scored positions per row
    failed: bool = False

    @property
    def value(self) -> float:
        return math.nan if self.failed else pooled(self.row_sums, self.row_tokens)

    @property
    def se(self) -> float:
        return math.nan if self.failed else cluster_se(self.row_sums, self.row_tokens)

    def paired(self, other: "Score") -> tuple[float, float]:
        """(self - other, its standard error) on the rows both have scored; NaNs when either failed."""
        if self.failed or other.failed:
            return math.nan, math.nan
        return paired(self.row_sums, other.row_sums, self.row_tokens[: min(self.rows, other.rows)])

    def head(self, rows: int) -> "Score":
        """The same plan on its first ``rows`` rows (at most the rows it has)."""
        r = min(rows, self.rows)
        return Score(r, self.row_sums[:r], self.row_tokens[:r], self.failed)

    @classmethod
    def from_rows(cls, row_sums: Sequence[float] | None, row_tokens: Sequence[int], sign: float = 1.0) -> "Score":
        """From an engine result's per-row sums (None: the plan failed); ``sign`` -1 turns a minimised objective
        into the maximised value optimizers see."""
        tokens = np.asarray(row_tokens, dtype=np.int64)
        if row_sums is None:
            return cls(len(tokens), np.full(len(tokens), math.nan), tokens, failed=True)
        return cls(len(tokens), sign * np.asarray(row_sums, dtype=float), tokens)


@dataclass(frozen=True)
class RowGrid:
    """The rows a partial score can use: ``rows`` in the search set, scored in micro-batches of ``step`` rows. What a
    budget check prices partial-row work by before the search (``Optimizer.check_budget``)."""

    rows: int
    step: int


def check_rows(grid: RowGrid | Fidelity | None, option: str, rows: int | None) -> None:
    """One AllocoptError line when the row-count option ``option`` (``dp_rows``, ``race_first_rows``) asks for more
    rows than ``grid``'s search set has: it would silently mean all of them, no partial scoring at all. Nothing to
    check without partial scoring (``grid`` None: every plan is scored on all rows)."""
    if grid is not None and rows is not None and rows > grid.rows:
        raise AllocoptError(f"--option {option}={rows} is more than the search set's {grid.rows} rows; use at most "
                            f"{grid.rows} (or leave {option} out)")


class Fidelity(Protocol):
    """Partial scoring for an optimizer (``SearchContext.fidelity``); counts are in the optimizer's space."""

    rows: int          # rows of the search set: a full-fidelity value scores all of them
    step: int          # rows per micro-batch: partial scores cover whole micro-batches

    def score(self, counts: np.ndarray, rows: int) -> list[Score]:
        """Scores of plans ``counts`` [n, L] on their first ``rows`` rows (rounded up to ``step``); nothing recorded
        yet: a plan becomes a trial when it is fully evaluated (COMPLETE) or pruned."""
        ...

    def prune(self, counts: np.ndarray) -> None:
        """Record plans ``counts`` [n, L] that lost a race as PRUNED trials (intermediate values by row count)."""
        ...
