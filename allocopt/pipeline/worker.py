"""The processes of a multi-process search: a worker (``allocopt worker``, :func:`serve`) rebuilds the evaluator from
the study's run configuration through :func:`~allocopt.pipeline.prepare`, then works the search's queue
(``allocopt.search.workers.work``); the coordinator (``allocopt run --workers N``) records through the queue and
starts N - 1 workers beside itself (:class:`WorkerPool`).

    allocopt run --storage postgresql://host/db --name big-run ...      # the coordinator
    allocopt worker --study big-run --storage postgresql://host/db      # as many of these as you like
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
import types
from typing import Any, Self

from allocopt import defaults
from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.io import host_name
from allocopt.pipeline.prepare import prepare
from allocopt.search.study import KEPT, LAYER_BITS, sqlite_file
from allocopt.search.workers import (POLL_S, READY, RUN_CONFIG, OwnedRecorder, QueueRecorder, join_study, owner_id,
                                     work)


def serve(storage: str, study_name: str, batch: int = 1, idle_timeout: float | None = None,
          parent: int | None = None, loading: dict[str, Any] | None = None) -> int:
    """Evaluate WAITING trials of a study until its search is done; returns how many this worker evaluated.

    The evaluator is rebuilt from the study's ``run_config`` (``loading``: this machine's loading options, which
    replace the coordinator's) and refused unless its model and search data have the fingerprints the study was
    scored with (a worker on other weights would poison the study).
    """
    queue = join_study(storage, study_name)
    study = queue.study
    deadline = time.monotonic() + (idle_timeout if idle_timeout is not None else math.inf)
    while RUN_CONFIG not in study.user_attrs:                # the coordinator may still be starting
        if time.monotonic() > deadline:
            raise AllocoptError(f"study {study_name!r} hands out no work: it was searched in one process (without "
                                "--workers), or its coordinator has not started yet; start the search with `allocopt run "
                                "--workers N --storage URL`, then workers on that storage")
        time.sleep(POLL_S * 10)
    attrs = study.user_attrs
    config = RunConfig(**{**attrs[RUN_CONFIG], **{k: v for k, v in (loading or {}).items() if v not in (None, {})}})
    evaluator = prepare(config, search=False, progress=False, expect=attrs).evaluator
    study.set_user_attr(READY + owner_id(), True)        # the coordinator's WorkerPool waits for this

    def evaluate_trials(trials: list) -> list[Any]:
        return evaluator.evaluate([_trial_plan(t) for t in trials])

    return work(queue, evaluate_trials, batch, idle_timeout, parent)


class WorkerPool:
    """Starts ``extra`` `allocopt worker` processes on the recorder's study; the block's end marks the search
    done (they exit once idle) and waits for them."""

    def __init__(self, recorder: QueueRecorder, storage: str, study_name: str, extra: int):
        self.args = [sys.executable, "-m", "allocopt.cli.main", "worker", "--study", study_name, "--storage", storage,
                     "--batch", str(recorder.batch), "--exit-with-parent", str(os.getpid())]
        self.recorder, self.extra, self.procs = recorder, extra, []

    def __enter__(self) -> Self:
        from transformers.utils import logging as hf_logging

        # The run reports the search: a worker's own count line would add to it (and to an error's one line), and a
        # quiet run's workers show no loading bars either.
        env = dict(os.environ)
        if not hf_logging.is_progress_bar_enabled():
            env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        self.procs = [subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
                      for _ in range(self.extra)]
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        """Start the search once every worker has its model loaded (or died, or defaults.WORKER_START_S passed), so the
        work is shared from the first generation instead of done here while the workers are still loading."""
        host, deadline = host_name(), time.monotonic() + defaults.WORKER_START_S
        waiting = {f"{READY}{host}:{p.pid}": p for p in self.procs}
        while waiting and time.monotonic() < deadline:
            attrs = self.recorder.study.user_attrs
            waiting = {k: p for k, p in waiting.items() if k not in attrs and p.poll() is None}
            time.sleep(POLL_S * 4)

    def __exit__(self, *exc: object) -> None:
        self.recorder.finish()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _trial_plan(trial) -> Any:
    """What a WAITING trial asks to score: its kept ids, and its layers' bit-widths for a joint plan (--bits)."""
    kept = {int(l): ids for l, ids in trial.user_attrs[KEPT].items()}
    bits = trial.user_attrs.get(LAYER_BITS)
    if not bits:
        return kept
    return types.SimpleNamespace(kept=kept, bits={int(l): int(b) for l, b in bits.items()})   # Evaluator.key reads both


def uses_queue(config: RunConfig) -> bool:
    """Queue mode when several processes evaluate, or when the storage is a server other workers can join."""
    return config.workers > 1 or sqlite_file(config.storage_url) is None


def recorder_for(config: RunConfig, directions: list[str], attrs: dict[str, Any], metric_names: list[str], *,
                 space=None, ranking=None) -> OwnedRecorder:
    """The recorder for a run: owner-tagged trials always; the WAITING-trial queue in multi-worker mode."""
    if uses_queue(config):
        return QueueRecorder(config.storage_url, config.name, directions, attrs, metric_names, space=space,
                             ranking=ranking, run_config=config.to_json())
    return OwnedRecorder(config.storage_url, config.name, directions, attrs, metric_names, space=space, ranking=ranking)


def workers_for(config: RunConfig, recorder: OwnedRecorder):
    """Context manager running ``config.workers - 1`` worker processes beside this one (a no-op otherwise)."""
    if isinstance(recorder, QueueRecorder):
        return WorkerPool(recorder, config.storage_url, config.name, extra=config.workers - 1)
    return contextlib.nullcontext()


__all__ = ["WorkerPool", "recorder_for", "serve", "uses_queue", "workers_for"]
