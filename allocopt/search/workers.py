"""Crash-safe and multi-process evaluation on one Optuna study.

The study is the only shared state. Every trial carries the process that owns it (``owner`` =
``host:pid``), so a restarted run can tell a trial left RUNNING by a killed process (mark it FAIL, never
count it) from one a live worker is still evaluating. With several workers the study is also the queue:
the coordinator enqueues the plans an optimizer asks for as WAITING trials, every worker (the coordinator
included) takes WAITING trials one state change at a time (the storage refuses a second taker), evaluates
and tells, and the coordinator returns once each of its plans has a finished trial. So no plan is
evaluated twice and none is lost, whichever process dies.

    recorder = QueueRecorder(storage, name, ["maximize"], attrs, ["esap"], space=space, ranking=ranking,
                             run_config=config.to_json())
    with WorkerPool(recorder, storage, name, extra=3):   # 3 `allocopt worker` processes beside this one
        evaluate = recorder.wrap(evaluate_plans, optimizer="ga")
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from allocopt.errors import AllocoptError
from allocopt.search.study import ALLOCATION, StudyRecorder, check_storage, outcome

OWNER = "owner"                 # trial user attr: "host:pid" of the process evaluating it
ORPHANED = "orphaned"           # trial user attr: True when FAILed because its owner died (retry, never a result)
RUN_CONFIG = "run_config"       # study user attr: the RunConfig a worker rebuilds the evaluator from
SEARCH_DONE = "search_done"     # study user attr: the coordinator finished; idle workers exit
READY = "worker_ready:"         # study user attr prefix + owner: that worker's evaluator is built
WORKER_START_S = 300.0          # how long a WorkerPool waits for its workers before evaluating alone
POLL_S = 0.05


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool | None:
    """True/False for a process on this host; None when it runs elsewhere (cannot be checked from here)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def fail_orphans(study: optuna.Study) -> int:
    """Mark every RUNNING trial whose owner process is dead as FAIL (``orphaned``); returns how many.

    Run on every start and while waiting for workers: a killed run or worker leaves RUNNING trials that must
    never count as results and must not block their plans from being evaluated again.
    """
    storage, failed = study._storage, 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER)
        if owner_alive(owner) is not False:
            continue
        storage.set_trial_user_attr(trial._trial_id, ORPHANED, True)
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"process {owner or 'unknown'} died while evaluating")
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass                                     # it finished after all
    return failed


def require_study(storage: str, study_name: str) -> optuna.Study:
    """The existing study (``--resume`` / ``allocopt worker``); a one-line error when there is none."""
    check_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise AllocoptError(f"no study {study_name!r} in {storage} to resume; drop --resume to start it, "
                            "or pass the --name/--storage of the earlier run") from None


class OwnedRecorder(StudyRecorder):
    """A StudyRecorder whose trials name their owner process, and which fails a dead run's leftovers on start."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.orphans_failed = fail_orphans(self.study)

    def owner_attrs(self) -> dict[str, Any]:
        return {OWNER: owner_id()}


class QueueRecorder(OwnedRecorder):
    """Evaluations go through the study's WAITING queue so any number of workers can share them."""

    def __init__(self, *args: Any, run_config: dict[str, Any], batch: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batch = batch
        self.study.set_user_attr(RUN_CONFIG, run_config)
        self.study.set_user_attr(SEARCH_DONE, False)

    def finish(self) -> None:
        self.study.set_user_attr(SEARCH_DONE, True)

    def wrap(self, evaluate_plans: Callable[[np.ndarray], list[Any]], optimizer: str
             ) -> Callable[[np.ndarray], np.ndarray]:
        def evaluate_trials(trials: list[FrozenTrial]) -> list[Any]:
            return list(evaluate_plans(np.array([t.user_attrs[ALLOCATION] for t in trials], dtype=np.int64)))

        def evaluate(counts: np.ndarray) -> np.ndarray:
            rows = [tuple(int(c) for c in x) for x in np.atleast_2d(np.asarray(counts))]
            known = self._outcomes()
            misses = [r for r in dict.fromkeys(rows) if r not in known]
            self._enqueue(misses, optimizer)
            while misses:
                if not process_waiting(self.study, evaluate_trials, self.batch):
                    fail_orphans(self.study)
                    known = self._outcomes()
                    self._enqueue([r for r in misses if r not in known], optimizer)
                    time.sleep(POLL_S)
                known = self._outcomes()
                misses = [r for r in misses if r not in known]
            return np.array([known[r] for r in rows], dtype=float)

        return evaluate

    def _outcomes(self) -> dict[tuple[int, ...], float]:
        """allocation -> value (NaN for an evaluation that failed); orphaned and unfinished trials are absent."""
        out: dict[tuple[int, ...], float] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            key = tuple(t.user_attrs.get(ALLOCATION, ()))
            if t.state == TrialState.COMPLETE:
                out[key] = float(t.values[0])
            elif not t.user_attrs.get(ORPHANED) and ALLOCATION in t.user_attrs:
                out.setdefault(key, math.nan)
        return out

    def _enqueue(self, plans: Iterable[tuple[int, ...]], optimizer: str) -> None:
        """Add a WAITING trial for each plan that has no trial waiting, running or finished.

        One read of the study decides it: a trial's state only moves forward (WAITING -> RUNNING -> finished),
        so a plan seen in any of those states is covered. Reading finished and pending trials separately let
        a worker finish a plan in between, which then looked new and was evaluated twice.
        """
        covered = {tuple(t.user_attrs[ALLOCATION]) for t in self.study.get_trials(deepcopy=False)
                   if ALLOCATION in t.user_attrs and not (t.state == TrialState.FAIL and t.user_attrs.get(ORPHANED))}
        for plan in dict.fromkeys(plans):
            if plan not in covered:
                self._add_waiting(plan, optimizer)

    def _add_waiting(self, plan: tuple[int, ...], optimizer: str) -> None:
        distributions = self.trial_distributions()
        params = {name: int(count) for name, count in zip(distributions, plan)}
        template = FrozenTrial(number=-1, state=TrialState.WAITING, value=None, datetime_start=None,
                               datetime_complete=None, params=params, distributions=distributions,
                               user_attrs=self.trial_attrs(plan, optimizer), system_attrs={}, intermediate_values={},
                               trial_id=-1)
        self.study._storage.create_new_trial(self.study._study_id, template_trial=template)


def take_waiting(study: optuna.Study, limit: int) -> list[FrozenTrial]:
    """Claim up to ``limit`` WAITING trials for this process (WAITING -> RUNNING is refused to a second taker)."""
    storage, taken = study._storage, []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if len(taken) >= limit:
            break
        try:
            claimed = storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
        except (optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.StorageInternalError):
            claimed = False
        if claimed:
            storage.set_trial_user_attr(trial._trial_id, OWNER, owner_id())
            taken.append(storage.get_trial(trial._trial_id))
    return taken


def process_waiting(study: optuna.Study, evaluate_trials: Callable[[list[FrozenTrial]], Sequence[Any]],
                    batch: int) -> int:
    """Take a batch of WAITING trials, evaluate them in one call and tell each; returns how many were done."""
    trials = take_waiting(study, batch)
    if not trials:
        return 0
    try:
        results = evaluate_trials(trials)
    except BaseException:
        for t in trials:                                    # give the plans back to the queue's next taker
            study._storage.set_trial_user_attr(t._trial_id, ORPHANED, True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        raise
    for t, result in zip(trials, results):
        tell(study, t, result)
    return len(trials)


def tell(study: optuna.Study, trial: FrozenTrial, result: Any) -> None:
    """Record one evaluation exactly as StudyRecorder does (``study.outcome``), through the storage."""
    out = outcome(result, trial.user_attrs.get("memory_bytes"), len(study.directions))
    for key, value in out.attrs.items():
        study._storage.set_trial_user_attr(trial._trial_id, key, value)
    state = TrialState.FAIL if out.values is None else TrialState.COMPLETE
    study._storage.set_trial_state_values(trial._trial_id, state, out.values)


# ---- worker processes --------------------------------------------------------------------------------

def serve(storage: str, study_name: str, batch: int = 1, idle_timeout: float | None = None,
          parent: int | None = None, loading: dict[str, Any] | None = None) -> int:
    """Evaluate WAITING trials of a study until its search is done; returns how many this worker evaluated.

    The evaluator is rebuilt from the study's ``run_config`` and refused unless its model and search data
    have the fingerprints the study was scored with (a worker on other weights would poison the study).
    """
    from allocopt.config import RunConfig

    study = require_study(storage, study_name)
    deadline = time.monotonic() + (idle_timeout if idle_timeout is not None else math.inf)
    while RUN_CONFIG not in study.user_attrs:                # the coordinator may still be starting
        if time.monotonic() > deadline:
            raise AllocoptError(f"study {study_name!r} has no run configuration; start it with `allocopt run --storage ...` first")
        time.sleep(POLL_S * 10)
    attrs = study.user_attrs
    config = RunConfig(**{**attrs[RUN_CONFIG], **{k: v for k, v in (loading or {}).items() if v not in (None, {})}})
    evaluator = _evaluator(config, attrs)
    study.set_user_attr(READY + owner_id(), True)        # the coordinator's WorkerPool waits for this
    done = 0

    def evaluate_trials(trials: list[FrozenTrial]) -> list[Any]:
        return evaluator.evaluate([{int(l): ids for l, ids in t.user_attrs["kept"].items()} for t in trials])

    while True:
        n = process_waiting(study, evaluate_trials, batch)
        done += n
        if n:
            deadline = time.monotonic() + (idle_timeout if idle_timeout is not None else math.inf)
            continue
        if parent is not None and os.getppid() != parent:
            break                                            # the coordinator that started us is gone
        if study.user_attrs.get(SEARCH_DONE) or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    return done


def _evaluator(config, attrs: dict[str, Any]):
    from allocopt.data import load_tokens
    from allocopt.models import describe, load_model
    from allocopt.objectives import Evaluator

    model, tokenizer = load_model(config.model, config.load_options())
    if describe(model).fingerprint != attrs.get("model_fingerprint"):
        raise AllocoptError(f"model {config.model} here differs from the one the study was scored with; "
                            "give the worker the same checkpoint")
    tokens = load_tokens(config.search_data, tokenizer, config.search_seq_len, config.search_num_seqs, split="search")
    if tokens.fingerprint() != attrs.get("search_fingerprint"):
        raise AllocoptError(f"search data {config.search_data} here differs from the study's; give the worker the same data")
    return Evaluator(model, tokens, objective=config.objective, tolerance=config.tolerance)


class WorkerPool:
    """Starts ``extra`` `allocopt worker` processes on the recorder's study; the block's end marks the search
    done (they exit once idle) and waits for them."""

    def __init__(self, recorder: QueueRecorder, storage: str, study_name: str, extra: int):
        self.args = [sys.executable, "-m", "allocopt.cli.main", "worker", "--study", study_name, "--storage", storage,
                     "--batch", str(recorder.batch), "--exit-with-parent", str(os.getpid())]
        self.recorder, self.extra, self.procs = recorder, extra, []

    def __enter__(self) -> "WorkerPool":
        self.procs = [subprocess.Popen(self.args, stdin=subprocess.DEVNULL) for _ in range(self.extra)]
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        """Start the search once every worker has its model loaded (or died, or WORKER_START_S passed), so the
        work is shared from the first generation instead of done here while the workers are still loading."""
        host, deadline = socket.gethostname(), time.monotonic() + WORKER_START_S
        waiting = {f"{READY}{host}:{p.pid}": p for p in self.procs}
        while waiting and time.monotonic() < deadline:
            attrs = self.recorder.study.user_attrs
            waiting = {k: p for k, p in waiting.items() if k not in attrs and p.poll() is None}
            time.sleep(POLL_S * 4)

    def __exit__(self, *exc: Any) -> None:
        self.recorder.finish()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- what `allocopt run` uses ------------------------------------------------------------------------

def uses_queue(config) -> bool:
    """Queue mode when several processes evaluate, or when the storage is a server other workers can join."""
    return config.workers > 1 or not config.storage_url.startswith("sqlite")


def recorder_for(config, directions: list[str], attrs: dict[str, Any], metric_names: list[str], *,
                 space=None, ranking=None) -> OwnedRecorder:
    """The recorder for a run: owner-tagged trials always; the WAITING-trial queue in multi-worker mode."""
    if uses_queue(config):
        return QueueRecorder(config.storage_url, config.name, directions, attrs, metric_names, space=space,
                             ranking=ranking, run_config=config.to_json())
    return OwnedRecorder(config.storage_url, config.name, directions, attrs, metric_names, space=space, ranking=ranking)


def workers_for(config, recorder: OwnedRecorder):
    """Context manager running ``config.workers - 1`` worker processes beside this one (a no-op otherwise)."""
    import contextlib

    if isinstance(recorder, QueueRecorder):
        return WorkerPool(recorder, config.storage_url, config.name, extra=config.workers - 1)
    return contextlib.nullcontext()
