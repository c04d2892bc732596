"""Racing: successive halving inside a generation, so most candidates are decided on a few search rows.

EvoPress's multi-step selection (Sieberling et al., arXiv 2410.14649, `evo_prune_search.py`; related-work.md §1.2):
every offspring is scored on a small fidelity, the best fraction is promoted stage by stage to more rows, and only
the survivors are scored on all rows. Here the subsets are nested (the first r rows of the search set), so a
promotion only runs the rows added, comparisons inside a stage are paired (same rows for every entrant), and a
survivor's full value is exactly what a plain evaluation gives: racing only decides *which* plans get one.

A stage also drops entrants that are clearly worse than the incumbent (the best fully evaluated plan) on the same
rows: paired difference + ``z`` * its standard error < 0 (``z`` = None turns that off). Dropped and out-promoted
plans are PRUNED trials carrying their partial values by row count; survivors are COMPLETE trials.

    schedule = RaceSchedule.halving(rows=16, step=4)          # 4 -> 8 -> 16 rows, keep 1/4 then 1/2
    values = race(cache, offspring, schedule, z=2.0)          # full values of survivors, NaN for the pruned
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.search.fidelity import Fidelity, Score
from allocopt.search.problem import EvaluationCache


@dataclass(frozen=True)
class RaceSchedule:
    """Stage ``j`` scores its entrants on the first ``rows[j]`` rows and promotes ``keep[j]`` of them (a fraction,
    at least one); the last stage scores all rows and promotes nothing."""

    rows: tuple[int, ...]
    keep: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.rows) < 1 or len(self.keep) != len(self.rows) - 1:
            raise AllocoptError(f"a race needs n stage row counts and n-1 keep fractions (got rows {self.rows}, keep "
                                f"{self.keep}); e.g. rows (4, 8, 16), keep (0.25, 0.5)")
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise AllocoptError(f"race stage rows {self.rows} must increase from >= 1; e.g. (4, 8, 16)")
        if not all(0.0 < k <= 1.0 for k in self.keep):
            raise AllocoptError(f"race keep fractions {self.keep} must lie in (0, 1]; e.g. (0.25, 0.5)")

    @classmethod
    def halving(cls, rows: int, step: int, first: int | None = None, keep_first: float = 0.25,
                keep_next: float = 0.5) -> "RaceSchedule":
        """Stages first, 2*first, 4*first, ... up to all ``rows`` (multiples of the micro-batch ``step``); the first
        stage promotes ``keep_first`` of its entrants, later ones ``keep_next``. One stage when rows <= first."""
        first = max(step, int(first or step))
        first = -(-first // step) * step
        stages, r = [], first
        while r < rows:
            stages.append(r)
            r *= 2
        stages.append(rows)
        keep = tuple([keep_first] + [keep_next] * (len(stages) - 2))[: len(stages) - 1]
        return cls(tuple(stages), keep)


def race_schedule(fidelity: Fidelity | None, first_rows: int | None = None) -> RaceSchedule | None:
    """The race of one generation over ``fidelity``'s rows (first stage: ``first_rows``, default one micro-batch;
    the keep fractions of ``allocopt.defaults``), or None where racing is impossible: no fidelity (a multi-process
    search) or a search set of one micro-batch."""
    if fidelity is None or fidelity.rows <= fidelity.step:
        return None
    first = first_rows if first_rows is not None else fidelity.step
    return RaceSchedule.halving(fidelity.rows, fidelity.step, first=first, keep_first=defaults.RACE_KEEP_FIRST,
                                keep_next=defaults.RACE_KEEP_NEXT)


def race(cache: EvaluationCache, X: np.ndarray, schedule: RaceSchedule, z: float | None = None) -> np.ndarray:
    """Values [n] of plans ``X`` [n, L]: full values for known plans and race survivors, NaN for pruned ones.

    Plans the cache already knows (evaluated or pruned) are not raced again. The incumbent is the cache's best
    full value; its per-row scores come free (it was scored on every row).
    """
    X = np.atleast_2d(np.asarray(X, dtype=np.int64))
    keys = [tuple(int(v) for v in x) for x in X]
    alive = [k for k in dict.fromkeys(keys) if k not in cache.values and k not in cache.pruned]
    incumbent = _incumbent(cache) if z is not None else None
    for rows, keep in zip(schedule.rows[:-1], schedule.keep):
        if len(alive) <= 1 or cache.exhausted:
            break
        scored = cache.score(np.array(alive), rows)
        entrants = [(k, s) for k, s in zip(alive, scored) if s is not None]
        ranked = sorted(entrants, key=lambda ks: -_key_value(ks[1]))
        n_keep = max(1, math.ceil(keep * len(ranked)))
        promoted = [k for k, s in ranked[:n_keep] if not _clearly_worse(s, incumbent, z)]
        cache.prune(np.array([k for k, _ in ranked if k not in set(promoted)], dtype=np.int64).reshape(-1, X.shape[1]))
        alive = promoted
    if alive:
        cache(np.array(alive))
        unpaid = [k for k in alive if k not in cache.values]          # the budget ran out before their full value
        if unpaid:
            cache.prune(np.array(unpaid))
    return np.array([cache.values.get(k, math.nan) for k in keys])


def _key_value(score: Score) -> float:
    v = score.value
    return v if np.isfinite(v) else -math.inf


def _incumbent(cache: EvaluationCache) -> Score | None:
    best, value = cache.best()
    if not np.isfinite(value):
        return None
    [score] = cache.score(best[None], cache.rows)        # evaluated on every row: served, costs nothing
    return score


def _clearly_worse(score: Score, incumbent: Score | None, z: float | None) -> bool:
    """Paired difference to the incumbent on the same rows is below 0 by more than ``z`` standard errors."""
    if z is None or incumbent is None:
        return False
    if score.failed:
        return True
    diff, se = score.paired(incumbent.head(score.rows))
    return bool(np.isfinite(diff) and np.isfinite(se) and diff + z * se < 0)
