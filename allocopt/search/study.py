"""Every evaluated plan becomes an Optuna trial; plans already completed in the study are served, not re-run.

That makes any run resumable (re-running the same command evaluates nothing twice), lets several workers
share one study, and lets optuna-dashboard show each allocation: the counts are trial params
``layer_NNN`` (when the space is known) and the full plan is in the user attrs.

Racing (multi-fidelity) scores plans on the first rows of the search set first. A plan is written once it is
decided: COMPLETE with its full value, or PRUNED when it lost a race, each with its partial values as intermediate
values by row count (what ``trial.report(value, step=rows)`` then ``study.tell`` would store, in one transaction)
and its per-row sums in ``row_sums``, so a resumed search replays every race from the study without scoring again.

    recorder = StudyRecorder("sqlite:///studies/runs.db", "olmoe-50", ["maximize"], attrs, ["esap"], space=space)
    evaluate = recorder.wrap(evaluate_plans, optimizer="ga")      # -> SearchContext.evaluate
    evaluate.partial(counts, rows=4); evaluate.prune(counts)      # racing: partial scores, PRUNED trials
"""
from __future__ import annotations

import contextlib
import datetime
import math
import sqlite3
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from allocopt.errors import AllocoptError
from allocopt.search.space import AllocationSpace, param_name  # noqa: F401  (param_name: the trial params' names)

# Trial user attrs (plots, workers and the dashboard read them by these names).
ALLOCATION = "allocation"        # kept experts per MoE layer, the plan's counts
OPTIMIZER = "optimizer"          # the optimizer that asked for the plan
MEMORY_BYTES = "memory_bytes"    # expert memory the plan keeps
KEPT = "kept"                    # {layer: kept expert ids} (when the recorder knows the ranking)
LAYER_BITS = "layer_bits"        # {layer: bit-width} of a joint plan's quantized layers (--bits)
BOUND = "bound"                  # certified [lo, hi] around the value (ESAP's sparse teacher cache)
FAIL_REASON = "fail_reason"      # why the evaluation failed (a FAIL trial that is a result, see workers.ORPHANED)
UNIFORM = "uniform"              # True on the uniform plan, when a caller marks it (plots single it out)
# Optuna's system attr of a constrained trial (feasible when every value is <= 0), which study.best_trial and
# optuna-dashboard read; written directly because create_trial(constraints=...) exists only from Optuna 5.0 on.
CONSTRAINTS = "constraints"
ROW_SUMS = "row_sums"            # per-row sums of the objective over the rows scored
ROW_TOKENS = "row_tokens"        # scored positions of each of those rows
LAYER_TOKENS = "layer_tokens"    # decoder layer-tokens forwarded for the plan (its compute cost)
_OPTUNA_TABLES = {"studies", "trials", "version_info"}


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite storage URL (any driver spelling, query options ignored), resolved; None for a
    server or an in-memory database. Locks that serialise SQLite users are taken on files beside it."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).resolve()


def missing_database(url: str) -> Path | None:
    """The SQLite file of ``url`` when it does not exist yet (None for one that exists, a server or memory): there is
    no study to load, and opening the URL would create the file."""
    database = sqlite_file(url)
    return database if database is not None and not database.is_file() else None


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
    except sqlalchemy.exc.NoSuchModuleError as exc:
        raise AllocoptError(f"storage {shown}: {parsed.drivername!r} is not a database SQLAlchemy knows; pass e.g. "
                            "sqlite:///studies/run.db or postgresql://user@host/db") from exc
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


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.RDBStorage:
    """The Optuna storage of ``url``, built here so that allocopt holds it (claims, heartbeats and trial writes go
    through it) instead of reading a study's private ``_storage``.

    With ``heartbeat_interval`` (seconds) Optuna's heartbeat is on: ``optuna.storages.fail_stale_trials(study)`` then
    FAILs every RUNNING trial without a heartbeat for ``grace_period`` seconds and calls ``on_stale(study, trial)``
    for each (``allocopt.search.workers`` records the heartbeats and calls it).
    """
    with warnings.catch_warnings():                      # heartbeat_interval is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                          heartbeat_stale_trial_callback=on_stale)


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
    attrs: dict[str, Any] = {} if bound is None else {BOUND: bound}
    if getattr(result, "layer_tokens", None):
        attrs[LAYER_TOKENS] = int(result.layer_tokens)
    if getattr(result, "rows", 0) and math.isfinite(value):
        attrs[ROW_SUMS] = [float(x) for x in result.row_sums]
        attrs[ROW_TOKENS] = [int(t) for t in result.row_tokens]
    if not math.isfinite(value):
        attrs[FAIL_REASON] = str(getattr(result, "failed", None) or "objective returned no value")
        return Outcome(None, attrs)
    return Outcome([value] + ([float(memory_bytes)] if objectives == 2 else []), attrs)


@dataclass
class RowRecord:
    """What a plan has scored on the first ``rows`` rows: per-row sums (None when the plan failed)."""

    rows: int
    row_sums: tuple[float, ...] | None
    row_tokens: tuple[int, ...]
    failed: str | None = None
    steps: dict[int, float] = field(default_factory=dict)      # rows -> partial value reported in this run
    layer_tokens: int | None = None                              # compute spent on the plan so far (engine)

    def head(self, rows: int) -> RowRecord:
        r = min(rows, self.rows)
        sums = None if self.row_sums is None else self.row_sums[:r]
        return RowRecord(r, sums, self.row_tokens[:r], self.failed)


def row_record(result: Any) -> RowRecord | None:
    """The per-row record of an engine result (``ObjectiveValue``); None for results without rows (plain numbers)."""
    rows = getattr(result, "rows", 0)
    if not rows:
        return None
    failed = getattr(result, "failed", None)
    sums = None if failed or getattr(result, "value", None) is None else tuple(float(x) for x in result.row_sums)
    return RowRecord(int(rows), sums, tuple(int(t) for t in getattr(result, "row_tokens", ())), failed,
                     layer_tokens=getattr(result, "layer_tokens", None))


class StudyRecorder:
    """Makes every evaluation an Optuna trial and serves already-completed trials from the study (resume).

    ``attrs`` go into the study's and every trial's user attrs (model, criterion, objective, seed, ...).
    Optional ``space`` adds per-layer params and ``memory_bytes``; optional ``ranking`` adds the kept ids.
    With two directions the second objective told is the plan's memory in bytes (needs ``space``).
    A trial is written in one transaction once its plan is decided (see the module docstring).
    ``storage`` is a URL or a storage built by :func:`open_storage`; ``self.storage`` keeps it.
    """

    def __init__(self, storage: str | optuna.storages.RDBStorage, study_name: str, directions: list[str], attrs: dict,
                 metric_names: list[str], *, space: AllocationSpace | None = None,
                 ranking: dict[int, list[int]] | None = None):
        self.attrs, self.space, self.ranking = dict(attrs), space, ranking
        layers = space.layers if space is not None else tuple(attrs.get("layers", ()))
        self.layers = tuple(int(l) for l in layers)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.study = optuna.create_study(storage=self.storage, study_name=study_name, directions=directions,
                                         load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names(list(metric_names))
        for key, value in self.attrs.items():
            self.study.set_user_attr(key, value)

    def completed(self) -> dict[tuple[int, ...], float]:
        """allocation -> value of every COMPLETE trial (read from the storage)."""
        return {tuple(t.user_attrs[ALLOCATION]): float(t.values[0])
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if ALLOCATION in t.user_attrs}

    def wrap(self, evaluate_plans: Callable[..., list[Any]], optimizer: str) -> RecordedObjective:
        """``evaluate_plans(counts [n, L], rows=None) -> results`` recorded: full values through the study, plus
        ``partial``/``prune`` for racing when the results carry per-row sums (the engine's ``ObjectiveValue``)."""
        return RecordedObjective(self, evaluate_plans, optimizer)

    def trial_attrs(self, plan: tuple[int, ...], optimizer: str) -> dict[str, Any]:
        """The user attrs every trial of ``plan`` carries, whoever creates it (this process or a queue)."""
        attrs: dict[str, Any] = {**self.attrs, ALLOCATION: list(plan), OPTIMIZER: optimizer}
        if self.space is not None:
            attrs[MEMORY_BYTES] = int(self.space.memory_bytes(plan))
        if self.ranking is not None:            # a joint plan's first len(layers) coordinates are its counts
            attrs[KEPT] = {str(l): [int(e) for e in self.ranking[l][:k]] for l, k in zip(self.layers, plan[:len(self.layers)])}
        if hasattr(self.space, "to_plan_fields"):              # a joint plan: its layers' bit-widths (for workers)
            attrs[LAYER_BITS] = {str(l): int(b) for l, b in self.space.to_plan_fields(plan)[1].items()}
        return attrs

    def owner_attrs(self) -> dict[str, Any]:
        """Extra attrs of trials this process writes (OwnedRecorder names the process)."""
        return {}

    def trial_system_attrs(self, plan: tuple[int, ...]) -> dict[str, Any]:
        """Optuna's own ``constraints`` of a trial: a plan off the run's budget (a sensitivity probe keeps more or
        fewer experts than the budget to measure a layer) is infeasible, so ``study.best_trial`` and
        optuna-dashboard's best trial are the best plan on the budget, the one plan.json holds (for a search; a fixed
        allocation's plan.json holds its own plan even where the uniform one scores higher). Not for studies of
        several objectives (NSGA-II's front spans budgets on purpose)."""
        if self.space is None or len(self.study.directions) > 1:
            return {}
        return {CONSTRAINTS: self.space.constraints(plan)}      # feasible (all <= 0) only on the budget

    def trial_distributions(self) -> dict[str, IntDistribution]:
        """One integer param per MoE layer (what optuna-dashboard plots), bounded by the space."""
        if self.space is None:
            return {}
        return {name: IntDistribution(lo, hi) for name, lo, hi in self.space.params()}

    def record(self, plan: tuple[int, ...], optimizer: str, state: TrialState, values: list[float] | None,
               attrs: dict[str, Any], steps: dict[int, float], started: datetime.datetime) -> None:
        """Write one finished trial (COMPLETE, PRUNED or FAIL) with its params, attrs and intermediate values."""
        distributions = self.trial_distributions()
        params = {name: int(count) for name, count in zip(distributions, plan)}
        values = None if values is None else [float(v) for v in values]
        template = FrozenTrial(number=-1, state=state, value=None, values=values, datetime_start=started,
                               datetime_complete=datetime.datetime.now(), params=params, distributions=distributions,
                               user_attrs={**self.trial_attrs(plan, optimizer), **self.owner_attrs(), **attrs},
                               system_attrs=self.trial_system_attrs(plan), intermediate_values={int(k): float(v) for k, v in steps.items()},
                               trial_id=-1)
        self.study.add_trial(template)


class RecordedObjective:
    """The objective as the search sees it through a :class:`StudyRecorder` (see ``StudyRecorder.wrap``).

    Calling it evaluates plans at full fidelity; plans with a COMPLETE trial are served (read once, on the first
    call: the study is this process's own). ``partial(counts, rows)`` returns per-row records for racing, served
    from any trial's ``row_sums`` when it covers the rows; ``prune(counts)`` writes the PRUNED trials.
    """

    def __init__(self, recorder: StudyRecorder, evaluate_plans: Callable[..., list[Any]], optimizer: str):
        self.recorder, self.evaluate_plans, self.optimizer = recorder, evaluate_plans, optimizer
        self._known: dict[tuple[int, ...], float] | None = None
        self._rows: dict[tuple[int, ...], RowRecord] = {}
        self._pruned: set[tuple[int, ...]] = set()
        self._started: dict[tuple[int, ...], datetime.datetime] = {}
        self._earlier: frozenset[tuple[int, ...]] = frozenset()
        self.served: set[tuple[int, ...]] = set()   # plans answered by trials the study held before this process

    def _load(self) -> dict[tuple[int, ...], float]:
        if self._known is None:
            self._known = {}
            for t in self.recorder.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
                plan = tuple(t.user_attrs.get(ALLOCATION, ()))
                if not plan:
                    continue
                if t.state == TrialState.COMPLETE:
                    self._known[plan] = float(t.values[0])
                else:
                    self._pruned.add(plan)
                if ROW_SUMS in t.user_attrs:
                    sums, tokens = t.user_attrs[ROW_SUMS], t.user_attrs[ROW_TOKENS]
                    if plan not in self._rows or len(sums) > self._rows[plan].rows:
                        self._rows[plan] = RowRecord(len(sums), tuple(sums), tuple(tokens))
            self._earlier = frozenset(self._known)
        return self._known

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        known = self._load()
        rows = [tuple(int(c) for c in x) for x in np.atleast_2d(np.asarray(counts))]
        self.served.update(r for r in rows if r in self._earlier)
        misses = list(dict.fromkeys(r for r in rows if r not in known))
        now: dict[tuple[int, ...], float] = {}
        if misses:
            started = datetime.datetime.now()
            try:
                results = list(self.evaluate_plans(np.array(misses, dtype=np.int64)))
            except BaseException:
                for plan in misses:                      # nothing was written for them; a rerun evaluates them
                    self._started.pop(plan, None)
                raise
            for plan, result in zip(misses, results):
                now[plan] = self._finish(plan, result, started)
                if math.isfinite(now[plan]):             # a FAIL is retried by the next call, never served
                    known[plan] = now[plan]
        return np.array([known.get(r, now.get(r, math.nan)) for r in rows], dtype=float)

    def partial(self, counts: np.ndarray, rows: int) -> list[RowRecord]:
        """Per-row records of plans ``counts`` [n, L] on their first ``rows`` rows (``rows`` a multiple of the
        engine's micro-batch), evaluating only what neither this run nor the study has scored."""
        self._load()
        plans = [tuple(int(c) for c in x) for x in np.atleast_2d(np.asarray(counts))]
        todo = [p for p in dict.fromkeys(plans) if not self._covers(p, rows)]
        if todo:
            started = datetime.datetime.now()
            for plan, result in zip(todo, self.evaluate_plans(np.array(todo, dtype=np.int64), rows=rows)):
                record = row_record(result)
                if record is None:
                    raise AllocoptError("racing needs per-row results from the objective; turn it off with "
                                        "--option racing=false")
                previous = self._rows.get(plan)
                record.steps = dict(previous.steps) if previous is not None else {}
                record.steps[record.rows] = math.nan if record.row_sums is None else _value(result)
                self._rows[plan] = record
                self._started.setdefault(plan, started)
        return [self._rows[p].head(rows) for p in plans]

    def _covers(self, plan: tuple[int, ...], rows: int) -> bool:
        record = self._rows.get(plan)
        return record is not None and (record.rows >= rows or record.row_sums is None)

    def prune(self, counts: np.ndarray) -> None:
        """Write a PRUNED trial (FAIL when its partial evaluation failed) for each raced-out plan not yet in the
        study; its value is its last intermediate value, as ``study.tell(state=PRUNED)`` would set."""
        self._load()
        for plan in dict.fromkeys(tuple(int(c) for c in x) for x in np.atleast_2d(np.asarray(counts))):
            record = self._rows.get(plan)
            if plan in self._pruned or plan in self._known or record is None:
                continue
            self._pruned.add(plan)
            started = self._started.pop(plan, datetime.datetime.now())
            cost = {} if record.layer_tokens is None else {LAYER_TOKENS: int(record.layer_tokens)}
            if record.row_sums is None:
                self.recorder.record(plan, self.optimizer, TrialState.FAIL, None,
                                     {FAIL_REASON: record.failed or "objective returned no value", **cost},
                                     record.steps, started)
                continue
            last = record.steps[max(record.steps)] if record.steps else None
            values = [last] if last is not None and math.isfinite(last) and len(self.recorder.study.directions) == 1 else None
            self.recorder.record(plan, self.optimizer, TrialState.PRUNED, values,
                                 {ROW_SUMS: list(record.row_sums), ROW_TOKENS: list(record.row_tokens), **cost},
                                 record.steps, started)

    def _finish(self, plan: tuple[int, ...], result: Any, started: datetime.datetime) -> float:
        memory = self.recorder.space.memory_bytes(plan) if self.recorder.space is not None else None
        out = outcome(result, memory, len(self.recorder.study.directions))
        attrs = dict(out.attrs)
        record = row_record(result)
        previous = self._rows.get(plan)
        steps = dict(previous.steps) if previous is not None else {}
        if record is not None and record.row_sums is not None:
            record.steps = steps
            self._rows[plan] = record
        started = self._started.pop(plan, started)
        if out.values is None:
            self.recorder.record(plan, self.optimizer, TrialState.FAIL, None, attrs, steps, started)
            return math.nan
        self.recorder.record(plan, self.optimizer, TrialState.COMPLETE, out.values, attrs, steps, started)
        return out.values[0]
