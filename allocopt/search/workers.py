"""Crash-safe and multi-process evaluation on one Optuna study.

The study is the only shared state. With several workers the study is also the queue: the coordinator enqueues
the plans an optimizer asks for as WAITING trials, every worker (the coordinator included) takes WAITING trials
one state change at a time (the storage refuses a second taker), evaluates and tells, and the coordinator
returns once each of its plans has a finished trial. So no plan is evaluated twice and none is lost, whichever
process dies.

Liveness is Optuna's RDB heartbeat: while a process evaluates it records a heartbeat for each trial it holds
every ``HEARTBEAT_INTERVAL_S`` seconds (a thread; Optuna only does that itself inside ``study.optimize``, which
allocopt does not use), and the coordinator, whenever it waits for other workers' trials, runs
``optuna.storages.fail_stale_trials``: a RUNNING trial without a heartbeat for ``HEARTBEAT_GRACE_S`` seconds is
FAILed, on whatever host its worker died. Such an interrupted trial is never a result (a FAIL that is a result
carries ``fail_reason`` and is not ``orphaned``), so the coordinator queues its plan again as a new WAITING
trial: it is the only process that enqueues, so a plan is never queued twice. Every trial also names its owner
(``host:pid``); a dead owner on this host is found at once by its pid, without waiting out the grace period
(a run killed and resumed on one machine goes on at once).

    recorder = QueueRecorder(storage, name, ["maximize"], attrs, ["esap"], space=space, ranking=ranking,
                             run_config=config.to_json())
    with WorkerPool(recorder, storage, name, extra=3):   # 3 `allocopt worker` processes beside this one
        evaluate = recorder.wrap(evaluate_plans, optimizer="ga")
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from allocopt import defaults
from allocopt.errors import AllocoptError
from allocopt.io import host_name, pid_alive
from allocopt.search.study import (
    ALLOCATION,
    FAIL_REASON,
    MEMORY_BYTES,
    StudyRecorder,
    check_storage,
    missing_database,
    open_storage,
    outcome,
    sqlite_file,
)

logger = logging.getLogger(__name__)

OWNER = "owner"                 # trial user attr: "host:pid" of the process evaluating it
ORPHANED = "orphaned"           # trial user attr: True when FAILed because its owner died (retry, never a result)
RUN_CONFIG = "run_config"       # study user attr: the RunConfig a worker rebuilds the evaluator from
SEARCH_DONE = "search_done"     # study user attr: the coordinator finished; idle workers exit
READY = "worker_ready:"         # study user attr prefix + owner: that worker's evaluator is built
HEARTBEAT = "heartbeat"         # study user attr: {"interval_s", "grace_s"} the coordinator judges liveness by
POLL_S = defaults.WORKER_POLL_S


def owner_id() -> str:
    return f"{host_name()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool | None:
    """True/False for a process on this host; None when it runs elsewhere or is not named yet (its heartbeat
    decides: a claimer names itself just after its claim, so a nameless RUNNING trial may be a live one's)."""
    if not owner:
        return None
    host, _, pid = owner.rpartition(":")
    if host != host_name():
        return None
    return pid_alive(int(pid)) if pid.isdigit() else True


def interrupted(trial: FrozenTrial) -> bool:
    """A FAIL trial whose evaluation never ended (its worker died, lost its heartbeat or raised): its plan goes back
    to the queue and it never counts as a result. A FAIL that is a result names its ``fail_reason`` and is not
    ``orphaned``; Optuna's ``fail_stale_trials`` cannot add attrs to the trials it fails, hence the two-sided test."""
    return trial.state == TrialState.FAIL and (bool(trial.user_attrs.get(ORPHANED)) or FAIL_REASON not in trial.user_attrs)


class StaleTrials:
    """The ``heartbeat_stale_trial_callback`` of a coordinator's storage: counts and logs the trials Optuna's
    ``fail_stale_trials`` failed. It re-queues nothing itself: the coordinator, the one process that enqueues,
    queues an interrupted trial's plan again when it still needs it (two enqueuers could queue a plan twice)."""

    def __init__(self, grace: int):
        self.grace, self.failed = grace, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failed += 1
        logger.warning(f"trial {trial.number} of {trial.user_attrs.get(OWNER, 'a worker')} had no heartbeat for "
                       f"{self.grace} s; it is failed and its plan queued again")


class StudyQueue:
    """One process's handle on a shared study: the study, the storage this process opened for it, and the heartbeat
    interval (seconds) its evaluations beat at.

    Trial-level writes go through ``storage``, a ``BaseStorage`` object built here (``open_storage``): claiming a
    WAITING trial has no public Optuna call (``study.ask`` takes one but creates a new trial when none waits), and
    heartbeats are ``storage.record_heartbeat``. Trial ids come from the public
    ``storage.get_trial_id_from_study_id_trial_number``, since ``FrozenTrial`` has no public id.
    """

    def __init__(self, study: optuna.Study, storage: optuna.storages.RDBStorage, interval: int):
        self.study, self.storage, self.interval = study, storage, int(interval)
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self._reaped = -math.inf

    def trial_id(self, trial: FrozenTrial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def reap(self, force: bool = False) -> int:
        """FAIL the trials of dead workers: at once for a dead process on this host (``fail_orphans``), and, at most
        once per heartbeat interval unless ``force``, every trial whose heartbeat lapsed, on any host (a no-op
        unless the storage was opened with a grace period). Returns how many this call failed."""
        failed = fail_orphans(self)
        now = time.monotonic()
        if force or now - self._reaped >= self.interval:
            self._reaped = now
            stale = self.storage.get_heartbeat_stale_trial_callback()
            before = getattr(stale, "failed", 0)
            with warnings.catch_warnings():              # fail_stale_trials is flagged experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            failed += getattr(stale, "failed", 0) - before
        return failed


def fail_orphans(queue: StudyQueue) -> int:
    """Mark every RUNNING trial whose owner process on this host is dead as FAIL (``orphaned``); returns how many.

    Run on every start and while waiting for workers: a killed run or worker leaves RUNNING trials that must
    never count as results and must not block their plans from being evaluated again. Owners on other hosts are
    judged by their heartbeats (``StudyQueue.reap``); this finds a dead one here without waiting the grace period.
    """
    failed = 0
    for trial in queue.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER)
        if owner_alive(owner) is not False:
            continue
        trial_id = queue.trial_id(trial)
        try:                                         # attrs first: a finished trial takes no more writes
            queue.storage.set_trial_user_attr(trial_id, ORPHANED, True)
            queue.storage.set_trial_user_attr(trial_id, FAIL_REASON, f"process {owner} died while evaluating")
            queue.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            failed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass                                     # it finished after all, or someone else failed it
    return failed


RESUME_FIX = "drop --resume to start it, or pass the --name/--storage of the earlier run"
WORKER_FIX = "pass the --storage and --study of a search started with `allocopt run --workers N --storage URL`"


def require_study(storage: str, study_name: str) -> optuna.Study:
    """The existing study of ``--resume``; a one-line error when there is none (and no database is created)."""
    return join_study(storage, study_name, fix=RESUME_FIX).study


def join_study(url: str, study_name: str, fix: str = WORKER_FIX) -> StudyQueue:
    """A worker's handle on an existing study (its evaluations beat at the default interval until ``work`` reads
    the coordinator's from the study); AllocoptError naming ``fix`` when there is no such study. A missing SQLite
    file is refused before Optuna opens it (opening would leave an empty study database behind)."""
    check_storage(url)
    database = missing_database(url)
    if database is not None:
        raise AllocoptError(f"no study {study_name!r}: the study database {database} does not exist; {fix}")
    storage = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise AllocoptError(f"no study {study_name!r} in {url}; {fix}") from None
    return StudyQueue(study, storage, defaults.HEARTBEAT_INTERVAL_S)


class OwnedRecorder(StudyRecorder):
    """A StudyRecorder whose trials name their owner process, and which fails a dead run's leftovers on start.

    ``heartbeat=(interval_s, grace_s)`` sets how often this process's evaluations beat and how long a silent trial
    stays RUNNING (default ``defaults.HEARTBEAT_INTERVAL_S``, ``defaults.HEARTBEAT_GRACE_S``; whole seconds)."""

    def __init__(self, storage: str | optuna.storages.RDBStorage, *args: Any,
                 heartbeat: tuple[int, int] | None = None, **kwargs: Any):
        interval, grace = heartbeat or (defaults.HEARTBEAT_INTERVAL_S, defaults.HEARTBEAT_GRACE_S)
        if not 0 < interval < grace:
            raise ValueError(f"the heartbeat interval ({interval} s) must be positive and shorter than the grace "
                             f"period ({grace} s)")
        self.heartbeat = {"interval_s": int(interval), "grace_s": int(grace)}
        if isinstance(storage, str):
            storage = open_storage(storage, heartbeat_interval=int(interval), grace_period=int(grace),
                                   on_stale=StaleTrials(int(grace)))
        super().__init__(storage, *args, **kwargs)
        self.queue = StudyQueue(self.study, self.storage, interval)
        self.orphans_failed = self.queue.reap(force=True)

    def owner_attrs(self) -> dict[str, Any]:
        return {OWNER: owner_id()}


class QueueObjective:
    """The objective as the search sees it through a :class:`QueueRecorder`: calling it on plans [n, L] queues each
    plan no trial answers as a WAITING trial, evaluates queued trials in this process too (``batch`` at a time) until
    every plan has an outcome, and returns the values [n] (NaN for a failed evaluation). Plans of dead workers' trials
    are queued again. ``served``: the plans answered by trials the study held before this search (a resumed study),
    as ``study.RecordedObjective.served``."""

    def __init__(self, recorder: QueueRecorder, evaluate_plans: Callable[[np.ndarray], list[Any]], optimizer: str):
        self.recorder, self.evaluate_plans, self.optimizer = recorder, evaluate_plans, optimizer
        self.earlier = frozenset(recorder.outcomes())     # the study's trials before this search
        self.served: set[tuple[int, ...]] = set()

    def _evaluate_trials(self, trials: list[FrozenTrial]) -> list[Any]:
        return list(self.evaluate_plans(np.array([t.user_attrs[ALLOCATION] for t in trials], dtype=np.int64)))

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        recorder = self.recorder
        rows = [tuple(int(c) for c in x) for x in np.atleast_2d(np.asarray(counts))]
        known = recorder.outcomes()
        self.served.update(r for r in rows if r in self.earlier)
        misses = [r for r in dict.fromkeys(rows) if r not in known]
        recorder.enqueue(misses, self.optimizer)
        while misses:
            if not process_waiting(recorder.queue, self._evaluate_trials, recorder.batch):
                recorder.queue.reap()                    # dead workers' trials -> FAIL (interrupted) ...
                known = recorder.outcomes()
                recorder.enqueue([r for r in misses if r not in known], self.optimizer)   # ... and queued again
                time.sleep(POLL_S)
            known = recorder.outcomes()
            misses = [r for r in misses if r not in known]
        return np.array([known[r] for r in rows], dtype=float)


class QueueRecorder(OwnedRecorder):
    """Evaluations go through the study's WAITING queue so any number of workers can share them."""

    def __init__(self, *args: Any, run_config: dict[str, Any], batch: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batch = batch
        self.study.set_user_attr(HEARTBEAT, self.heartbeat)   # before run_config: workers read both once it is set
        self.study.set_user_attr(RUN_CONFIG, run_config)
        self.study.set_user_attr(SEARCH_DONE, False)

    def finish(self) -> None:
        self.study.set_user_attr(SEARCH_DONE, True)

    def wrap(self, evaluate_plans: Callable[[np.ndarray], list[Any]], optimizer: str) -> QueueObjective:
        return QueueObjective(self, evaluate_plans, optimizer)

    def outcomes(self) -> dict[tuple[int, ...], float]:
        """allocation -> value (NaN for an evaluation that failed); interrupted and unfinished trials are absent."""
        out: dict[tuple[int, ...], float] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            key = tuple(t.user_attrs.get(ALLOCATION, ()))
            if t.state == TrialState.COMPLETE:
                out[key] = float(t.values[0])
            elif not interrupted(t) and ALLOCATION in t.user_attrs:
                out.setdefault(key, math.nan)
        return out

    def enqueue(self, plans: Iterable[tuple[int, ...]], optimizer: str) -> None:
        """Add a WAITING trial for each plan that has no trial waiting, running or finished (interrupted ones aside).

        One read of the study decides it: a trial's state only moves forward (WAITING -> RUNNING -> finished),
        so a plan seen in any of those states is covered. Reading finished and pending trials separately let
        a worker finish a plan in between, which then looked new and was evaluated twice.
        """
        covered = {tuple(t.user_attrs[ALLOCATION]) for t in self.study.get_trials(deepcopy=False)
                   if ALLOCATION in t.user_attrs and not interrupted(t)}
        for plan in dict.fromkeys(plans):
            if plan not in covered:
                self._add_waiting(plan, optimizer)

    def _add_waiting(self, plan: tuple[int, ...], optimizer: str) -> None:
        distributions = self.trial_distributions()
        params = {name: int(count) for name, count in zip(distributions, plan)}
        # Not study.enqueue_trial: that stores the params as fixed_params for a later suggest_*; these trials carry
        # their params (the dashboard plots them) and are never sampled.
        self.study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=params,
                                                       distributions=distributions,
                                                       user_attrs=self.trial_attrs(plan, optimizer),
                                                       system_attrs=self.trial_system_attrs(plan)))


class Heartbeat:
    """Records a heartbeat for each trial in ``trial_ids`` every ``interval`` seconds from a thread, while the block
    runs (``storage.record_heartbeat`` is the public ``BaseHeartbeat`` call Optuna's own heartbeat thread makes).
    A failed write is logged and retried next time: a worker that cannot reach the storage loses its trials after
    the grace period, which is the point."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_ids: Sequence[int], interval: float):
        self.storage, self.trial_ids, self.interval = storage, list(trial_ids), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="allocopt-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except optuna.exceptions.StorageInternalError as exc:   # what Optuna makes of database errors
                    logger.warning(f"could not record the heartbeat of trial id {trial_id} ({type(exc).__name__}); "
                                   "retrying")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def take_waiting(queue: StudyQueue, limit: int) -> list[tuple[int, FrozenTrial]]:
    """Claim up to ``limit`` WAITING trials for this process (WAITING -> RUNNING is refused to a second taker);
    returns (trial id, trial) pairs.

    No public Optuna call claims a WAITING trial without creating one when none waits (``study.ask`` does), so the
    claim is ``storage.set_trial_state_values(id, RUNNING)`` on the storage this process holds, as ``study.ask``
    itself does. A heartbeat is recorded just before the claim: Optuna never counts a trial without any heartbeat
    as stale, so a claimer killed between its claim and its first beat would leave the trial RUNNING for ever.
    """
    taken: list[tuple[int, FrozenTrial]] = []
    for trial in queue.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if len(taken) >= limit:
            break
        trial_id = queue.trial_id(trial)
        with claim_lock(queue.storage.url):
            try:
                claimed = queue.storage.get_trial(trial_id).state == TrialState.WAITING     # still free, under the lock
                if claimed:
                    queue.storage.record_heartbeat(trial_id)
                    claimed = queue.storage.set_trial_state_values(trial_id, TrialState.RUNNING)
            except (optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.StorageInternalError):
                claimed = False
        if claimed:
            queue.storage.set_trial_user_attr(trial_id, OWNER, owner_id())
            taken.append((trial_id, queue.storage.get_trial(trial_id)))
    return taken


@contextlib.contextmanager
def claim_lock(url: str):
    """Claims serialised where the database cannot serialise them. On a server the claim is one UPDATE under a row
    lock (``SELECT ... FOR UPDATE``), so two takers never both get a WAITING trial; SQLite ignores that lock, and two
    processes could both read WAITING and both claim (then one crashes on the other's finished trial). Every process
    on an SQLite study shares one machine, so there a claim holds an exclusive lock on a file beside the database."""
    database = sqlite_file(url)
    if database is None:
        yield
        return
    with open(database.with_name(database.name + ".claims.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def process_waiting(queue: StudyQueue, evaluate_trials: Callable[[list[FrozenTrial]], Sequence[Any]],
                    batch: int) -> int:
    """Take a batch of WAITING trials, evaluate them in one call while their heartbeats run, and tell each;
    returns how many were taken."""
    taken = take_waiting(queue, batch)
    if not taken:
        return 0
    with Heartbeat(queue.storage, [trial_id for trial_id, _ in taken], queue.interval):
        try:
            results = evaluate_trials([trial for _, trial in taken])
        except BaseException:
            for trial_id, trial in taken:                 # give the plans back to the queue's next taker
                _give_back(queue, trial_id, trial)
            raise
        for (trial_id, trial), result in zip(taken, results):
            tell(queue, trial_id, trial, result)
    return len(taken)


def _give_back(queue: StudyQueue, trial_id: int, trial: FrozenTrial) -> None:
    try:
        queue.storage.set_trial_user_attr(trial_id, ORPHANED, True)
        queue.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass                                              # already failed as stale: it is interrupted either way


def tell(queue: StudyQueue, trial_id: int, trial: FrozenTrial, result: Any) -> bool:
    """Record one evaluation exactly as StudyRecorder does (``study.outcome``): its attrs, then ``study.tell``.
    False when the trial was failed meanwhile (its heartbeat lapsed and its plan went to another worker): the
    result is dropped, since the plan's new trial will have its own."""
    out = outcome(result, trial.user_attrs.get(MEMORY_BYTES), len(queue.study.directions))
    state = TrialState.FAIL if out.values is None else TrialState.COMPLETE
    try:
        for key, value in out.attrs.items():
            queue.storage.set_trial_user_attr(trial_id, key, value)
        told = queue.study.tell(trial.number, out.values, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        told = None
    if told is None or told.state != state:
        logger.warning(f"trial {trial.number} was failed before its result came (no heartbeat for the grace period); "
                       "its result is dropped and its plan evaluated by another worker")
        return False
    return True


# ---- worker processes --------------------------------------------------------------------------------

def work(queue: StudyQueue, evaluate_trials: Callable[[list[FrozenTrial]], Sequence[Any]], batch: int = 1,
         idle_timeout: float | None = None, parent: int | None = None) -> int:
    """A worker's loop: take, evaluate (heartbeats at the study's interval) and tell WAITING trials until the search
    is done, ``idle_timeout`` seconds pass without work, or the process ``parent`` is gone; returns how many."""
    queue.interval = int(queue.study.user_attrs.get(HEARTBEAT, {}).get("interval_s", queue.interval))
    deadline = time.monotonic() + (idle_timeout if idle_timeout is not None else math.inf)
    done = 0
    while True:
        n = process_waiting(queue, evaluate_trials, batch)
        done += n
        if n:
            deadline = time.monotonic() + (idle_timeout if idle_timeout is not None else math.inf)
            continue
        if parent is not None and os.getppid() != parent:
            break                                            # the coordinator that started us is gone
        if queue.study.user_attrs.get(SEARCH_DONE) or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    return done
