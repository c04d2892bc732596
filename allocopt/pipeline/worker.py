"""A worker process of a multi-process search (``allocopt worker``): the evaluator rebuilt from the study's run
configuration through :func:`~allocopt.pipeline.prepare`, then the search's queue (``allocopt.search.workers.work``).

    allocopt run --storage postgresql://host/db --name big-run ...      # the coordinator
    allocopt worker --study big-run --storage postgresql://host/db      # as many of these as you like
"""
from __future__ import annotations

import math
import time
from typing import Any

from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.pipeline.prepare import prepare
from allocopt.search.study import KEPT
from allocopt.search.workers import POLL_S, READY, RUN_CONFIG, join_study, owner_id, work


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
            raise AllocoptError(f"study {study_name!r} has no run configuration; start it with `allocopt run --storage ...` first")
        time.sleep(POLL_S * 10)
    attrs = study.user_attrs
    config = RunConfig(**{**attrs[RUN_CONFIG], **{k: v for k, v in (loading or {}).items() if v not in (None, {})}})
    evaluator = prepare(config, search=False, progress=False, expect=attrs).evaluator
    study.set_user_attr(READY + owner_id(), True)        # the coordinator's WorkerPool waits for this

    def evaluate_trials(trials: list) -> list[Any]:
        return evaluator.evaluate([{int(l): ids for l, ids in t.user_attrs[KEPT].items()} for t in trials])

    return work(queue, evaluate_trials, batch, idle_timeout, parent)


__all__ = ["serve"]
