"""Every evaluated plan becomes an Optuna trial; plans already completed in the study are served, not re-run.

That makes any run resumable (re-running the same command evaluates nothing twice), lets several workers
share one study, and lets optuna-dashboard show each allocation: the counts are trial params
``layer_NNN`` (when the space is known) and the full plan is in the user attrs.

    recorder = StudyRecorder("sqlite:///studies/runs.db", "olmoe-50", ["maximize"], attrs, ["esap"], space=space)
    evaluate = recorder.wrap(evaluate_plans, optimizer="ga")      # -> SearchContext.evaluate
"""
from __future__ import annotations

import contextlib
import math
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from allocopt.errors import AllocoptError
from allocopt.search.space import AllocationSpace

ALLOCATION = "allocation"
_OPTUNA_TABLES = {"studies", "trials", "version_info"}


def param_name(layer: int) -> str:
    return f"layer_{layer:03d}"


class _RecordedPlanSampler(BaseSampler):
    """Returns, for each ``layer_NNN`` param, the count already stored in the trial's ``allocation`` attr.

    Trials are created with ask/tell (a RUNNING trial marks work in progress for other workers), so params
    must come from a sampler; this one just replays the plan the optimizer chose.
    """

    def __init__(self, layers: Sequence[int]):
        self.index = {param_name(l): i for i, l in enumerate(layers)}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return trial.user_attrs[ALLOCATION][self.index[param_name]]


def check_storage(url: str) -> None:
    """Refuse a study database that is corrupt or belongs to another program before Optuna opens it.

    Optuna would add its tables to any SQLite file it is given (changing a stranger's file) and fails on a
    corrupt one with a SQL traceback; both become one line here. A server URL is connected to once, so a
    missing driver or an unreachable server fails in one line before the model is loaded.
    """
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise AllocoptError(f"storage {url!r} is not a database URL; pass e.g. sqlite:///studies/run.db "
                            "or postgresql://user@host/db") from exc
    if parsed.get_backend_name() != "sqlite":
        _check_server(parsed)
        return
    if parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    if not path.exists():
        if not path.parent.is_dir():
            raise AllocoptError(f"the folder {path.parent} of study database {path} does not exist; create it or pass another --storage")
        return
    if path.is_dir():
        raise AllocoptError(f"study database {path} is a directory; pass a file path in --storage")
    if path.stat().st_size == 0:                         # SQLite reads an empty file as an empty database
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as con:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise AllocoptError(f"study database {path} is corrupt or not an SQLite file ({exc}); "
                            "restore it from a backup or pass another --storage") from exc
    if verdict != "ok":
        raise AllocoptError(f"study database {path} is corrupt (integrity check: {verdict}); "
                            "restore it from a backup or pass another --storage")
    if tables and not _OPTUNA_TABLES <= tables:
        raise AllocoptError(f"{path} is an SQLite database of another program (tables: {', '.join(sorted(tables)[:5])}), "
                            "not an Optuna study; pass a new file or a study database in --storage")


def _check_server(parsed) -> None:
    import sqlalchemy

    shown = parsed.render_as_string(hide_password=True)
    try:
        engine = sqlalchemy.create_engine(parsed)
    except ImportError as exc:
        raise AllocoptError(f"storage {shown} needs a database driver that is not installed ({exc}); install it "
                            "(PostgreSQL: pip install 'allocopt[postgres]') or name an installed one in the URL") from exc
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise AllocoptError(f"cannot connect to study storage {shown} ({reason}); "
                            "check that the server runs and the URL's user, host, port and database") from exc
    finally:
        engine.dispose()


def _value(result: Any) -> float:
    value = getattr(result, "value", result)
    return float(value) if value is not None else math.nan


def _bound(result: Any) -> list[float] | None:
    lo, hi = getattr(result, "lo", None), getattr(result, "hi", None)
    return [float(lo), float(hi)] if lo is not None and hi is not None else None


@dataclass(frozen=True)
class Outcome:
    """What one evaluation records in its trial: objective values (None: the trial FAILs) and user attrs."""

    values: list[float] | None
    attrs: dict[str, Any]


def outcome(result: Any, memory_bytes: float | None, objectives: int) -> Outcome:
    """The trial record of an objective result (``ObjectiveValue`` or a number); shared by every recorder and
    worker so a plan's trial looks the same whoever evaluated it. Two objectives add the plan's memory."""
    value, bound = _value(result), _bound(result)
    attrs: dict[str, Any] = {} if bound is None else {"bound": bound}
    if not math.isfinite(value):
        attrs["fail_reason"] = str(getattr(result, "failed", None) or "objective returned no value")
        return Outcome(None, attrs)
    return Outcome([value] + ([float(memory_bytes)] if objectives == 2 else []), attrs)


class StudyRecorder:
    """Makes every evaluation an Optuna trial and serves already-completed trials from the study (resume).

    ``attrs`` go into the study's and every trial's user attrs (model, criterion, objective, seed, ...).
    Optional ``space`` adds per-layer params and ``memory_bytes``; optional ``ranking`` adds the kept ids.
    With two directions the second objective told is the plan's memory in bytes (needs ``space``).
    """

    def __init__(self, storage: str, study_name: str, directions: list[str], attrs: dict,
                 metric_names: list[str], *, space: AllocationSpace | None = None,
                 ranking: dict[int, list[int]] | None = None):
        self.attrs, self.space, self.ranking = dict(attrs), space, ranking
        layers = space.layers if space is not None else tuple(attrs.get("layers", ()))
        self.layers = tuple(int(l) for l in layers)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                         load_if_exists=True, sampler=_RecordedPlanSampler(self.layers))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names(list(metric_names))
        for key, value in self.attrs.items():
            self.study.set_user_attr(key, value)

    def completed(self) -> dict[tuple[int, ...], float]:
        """allocation -> value of every COMPLETE trial (re-read each call so other workers' trials count)."""
        return {tuple(t.user_attrs[ALLOCATION]): float(t.values[0])
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if ALLOCATION in t.user_attrs}

    def wrap(self, evaluate_plans: Callable[[np.ndarray], list[Any]], optimizer: str
             ) -> Callable[[np.ndarray], np.ndarray]:
        def evaluate(counts: np.ndarray) -> np.ndarray:
            rows = [tuple(int(c) for c in x) for x in np.atleast_2d(np.asarray(counts))]
            known = self.completed()
            misses = list(dict.fromkeys(r for r in rows if r not in known))
            if misses:
                trials = [self._start(plan, optimizer) for plan in misses]
                try:
                    results = list(evaluate_plans(np.array(misses, dtype=np.int64)))
                except BaseException:
                    for trial in trials:                 # never leave RUNNING trials behind
                        self.study.tell(trial, state=TrialState.FAIL)
                    raise
                for trial, plan, result in zip(trials, misses, results):
                    known[plan] = self._finish(trial, plan, result)
            return np.array([known[r] for r in rows], dtype=float)

        return evaluate

    def trial_attrs(self, plan: tuple[int, ...], optimizer: str) -> dict[str, Any]:
        """The user attrs every trial of ``plan`` carries, whoever creates it (this process or a queue)."""
        attrs: dict[str, Any] = {**self.attrs, ALLOCATION: list(plan), "optimizer": optimizer}
        if self.space is not None:
            attrs["memory_bytes"] = int(self.space.memory_bytes(plan))
        if self.ranking is not None:
            attrs["kept"] = {str(l): [int(e) for e in self.ranking[l][:k]] for l, k in zip(self.layers, plan)}
        return attrs

    def trial_distributions(self) -> dict[str, IntDistribution]:
        """One integer param per MoE layer (what optuna-dashboard plots), bounded by the space."""
        if self.space is None:
            return {}
        return {param_name(layer): IntDistribution(int(lo), int(hi))
                for layer, lo, hi in zip(self.space.layers, self.space.lower, self.space.upper)}

    def _start(self, plan: tuple[int, ...], optimizer: str) -> optuna.Trial:
        trial = self.study.ask()
        for key, value in self.trial_attrs(plan, optimizer).items():
            trial.set_user_attr(key, value)
        for name, distribution in self.trial_distributions().items():
            trial.suggest_int(name, distribution.low, distribution.high)
        return trial

    def _finish(self, trial: optuna.Trial, plan: tuple[int, ...], result: Any) -> float:
        memory = self.space.memory_bytes(plan) if self.space is not None else None
        out = outcome(result, memory, len(self.study.directions))
        for key, value in out.attrs.items():
            trial.set_user_attr(key, value)
        if out.values is None:
            self.study.tell(trial, state=TrialState.FAIL)
            return math.nan
        self.study.tell(trial, out.values)
        return out.values[0]
