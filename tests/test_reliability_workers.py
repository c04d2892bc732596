"""Four processes share one search on a real PostgreSQL server: `allocopt run --workers 2` (itself and one
spawned worker) plus two `allocopt worker` processes started by hand. No plan may be evaluated twice or lost,
and the plan must equal a single-process SQLite run with the same seed (who evaluated a plan does not matter).

The queue hands out whole evaluations, so a shared search scores every plan on all rows: ga's racing falls back
(plan.json and the CLI say so), and the single-process reference runs with racing off to be the same search."""
from __future__ import annotations

import collections
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from postgres import postgres_url
from reliability_kit import (
    ENV,
    allocopt,
    make_root,
    popen,
    run_args,
    save_tiny_model,
    sqlite_url,
    trial_counts,
)

from allocopt.pipeline.run import RACING_OFF_QUEUE

# A wider model and more tokens per plan than the other reliability tests, so the search outlasts the start-up
# of the hand-started workers (plans the coordinator takes before they are up are still evaluated exactly once,
# but then the sharing itself would go unchecked).
EVALS = ["--optimizer", "ga", "--evals", "32", "--population", "8", "--seed", "11", "--num-seqs", "32", "--seq-len", "96"]


@pytest.fixture(scope="module")
def pg_url():
    yield from postgres_url()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    save_tiny_model(root / "model", hidden_size=256, intermediate_size=384)
    return make_root(root, model=False)


def _wait_for_study(storage: str, name: str, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if "run_config" in optuna.load_study(study_name=name, storage=storage).user_attrs:
                return
        except KeyError:
            pass
        time.sleep(0.2)
    raise AssertionError("the coordinator never created its study")


def test_four_workers_on_postgres_lose_and_repeat_nothing(root, pg_url, record_property):
    reference = popen(*run_args(root, "single", *EVALS, "--option", "racing=false"))   # overlaps with the search below
    coordinator = popen(*run_args(root, "shared", "--storage", pg_url, "--workers", "2", *EVALS))
    _wait_for_study(pg_url, "shared", coordinator)
    extra = [popen("worker", "--study", "shared", "--storage", pg_url, "--idle-timeout", "120") for _ in range(2)]
    assert coordinator.wait(timeout=300) == 0, coordinator.stderr.read()
    for proc in extra:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    counts = trial_counts(pg_url, "shared")
    study = optuna.load_study(study_name="shared", storage=pg_url)
    owners = collections.Counter(t.user_attrs["owner"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    plan = json.loads((root / "runs" / "shared" / "plan.json").read_text())
    summary = (f"4 workers on PostgreSQL: {counts['complete']} COMPLETE, {counts['distinct']} distinct, duplicated "
               f"{counts['duplicated']}, left WAITING {counts['waiting']}, RUNNING {counts['running']}, FAIL "
               f"{counts['fail']}; plans per process {sorted(owners.values(), reverse=True)}; plan evaluations "
               f"{plan['evaluations']}")
    print(summary)
    record_property("workers_counts", summary)

    assert counts["duplicated"] == 0 and counts["waiting"] == 0 and counts["running"] == 0, summary
    assert counts["complete"] == plan["evaluations"] <= 32, summary     # nothing lost: every plan has its trial
    assert len(owners) >= 2, summary                                     # the work was really shared
    assert plan["racing"] == RACING_OFF_QUEUE and plan["pruned"] == 0, summary   # fell back, and said so
    assert not [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    single = json.loads((root / "runs" / "single" / "plan.json").read_text())
    assert plan["layers"] == single["layers"] and plan["esap"] == pytest.approx(single["esap"], abs=1e-9), summary
    assert trial_counts(sqlite_url(root, "single"), "single")["distinct"] == counts["distinct"]


def test_worker_for_a_missing_study_fails_in_one_line(pg_url):
    out = allocopt("worker", "--study", "nope", "--storage", pg_url)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "no study 'nope'" in out.stderr


# ---- liveness: Optuna's heartbeat across hosts, the pid check on this one -----------------------------------------
# The coordinator is a QueueRecorder in this process scoring a toy objective; the other workers are real processes
# running `allocopt.search.workers.work` (the loop of `allocopt worker`) on the same study. A worker posing as
# another host (ALLOCOPT_HOST) is SIGKILLed mid-trial: only its lapsed heartbeat can tell it is dead.

WORKER = """
import sys, time
from allocopt.search.workers import join_study, work

url, name, log, hold = sys.argv[1], sys.argv[2], sys.argv[3], [float(sys.argv[4])]

def evaluate(trials):
    with open(log, "a") as fh:
        fh.write(f"{trials[0].number}\\n")
    time.sleep(hold.pop() if hold else 0.0)          # the first trial is held, later ones are quick
    return [-sum((c - 6) ** 2 for c in t.user_attrs["allocation"]) for t in trials]

work(join_study(url, name), evaluate, idle_timeout=120)
"""
PLANS = [(6, 6, 6, 6)] + [tuple(6 + d * s for s in signs) for d in (1, 2) for signs in
                          ((1, -1, 0, 0), (0, 0, 1, -1), (1, 0, -1, 0), (0, 1, 0, -1))]


def _value(plan) -> float:
    return float(-sum((c - 6) ** 2 for c in plan))


@pytest.fixture(params=["sqlite", "postgresql"])
def study_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'liveness.db'}"
    return request.getfixturevalue("pg_url")


def _coordinator(url: str, name: str, heartbeat: tuple[int, int]):
    from allocopt.search.space import make_space
    from allocopt.search.workers import QueueRecorder

    layers = (0, 1, 2, 3)
    space = make_space({l: 12 for l in layers}, {l: 2 for l in layers}, {l: 64 for l in layers}, sparsity=0.5)
    return QueueRecorder(url, name, ["maximize"], {"objective": "toy"}, ["toy"], space=space,
                         ranking={l: list(range(12)) for l in layers}, run_config={}, heartbeat=heartbeat)


def _worker(url: str, name: str, log, hold: float, host: str | None) -> subprocess.Popen:
    """A `work` loop in its own process; ``host`` (ALLOCOPT_HOST) makes it another machine's as its trials say."""
    env = {k: v for k, v in ENV.items() if k != "ALLOCOPT_HOST"}
    if host:
        env["ALLOCOPT_HOST"] = host
    return subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(log), str(hold)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=os.getcwd())


def _wait_for_files(*paths, procs=(), timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text() for p in paths):
        for proc in procs:
            assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the workers never took a trial"
        time.sleep(0.05)


def _run_with_a_killed_worker(url: str, name: str, tmp_path, heartbeat: tuple[int, int], host: str | None,
                              slow_hold: float):
    """Coordinator + a worker killed holding a trial + a live worker holding its first trial ``slow_hold`` s.
    Returns (recorder, values, coordinator's evaluated plans, killed pid, slow pid, kill time, logs)."""
    recorder = _coordinator(url, name, heartbeat)
    logs = {"killed": tmp_path / f"{name}-killed.log", "slow": tmp_path / f"{name}-slow.log"}
    killed = _worker(url, name, logs["killed"], 3600, host)
    evaluated, kill, procs = [], {}, [killed]

    def evaluate_plans(counts):
        if not kill:                                    # both workers hold a trial: kill one mid-evaluation
            # the live worker starts once the doomed one holds its trial: started together, a worker that happens to
            # start first on a busy machine (hold 0) could take every waiting plan before the other one asks
            _wait_for_files(logs["killed"], procs=procs)
            procs.append(_worker(url, name, logs["slow"], slow_hold, host))
            _wait_for_files(logs["slow"], procs=procs)
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            kill["at"] = datetime.datetime.now()
        evaluated.extend(tuple(int(c) for c in row) for row in counts)
        return [_value(row) for row in counts]

    try:
        values = recorder.wrap(evaluate_plans, "toy")(np.array(PLANS))
        recorder.finish()
        slow = procs[1]
        assert slow.wait(timeout=60) == 0, slow.stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return recorder, values, evaluated, killed.pid, slow.pid, kill["at"], logs


def test_a_worker_dead_on_another_host_loses_its_trial_to_the_heartbeat(study_url, tmp_path, record_property):
    """Killed on "another host" mid-trial: FAILed once its heartbeat lapses for the grace period and its plan queued
    again; a live worker holding a trial longer than the grace period keeps it (its heartbeat thread beats)."""
    from allocopt.search.workers import OWNER, interrupted

    interval, grace = 1, 4
    name = f"liveness-remote-{study_url.split(':')[0]}"
    recorder, values, evaluated, killed_pid, slow_pid, killed_at, logs = _run_with_a_killed_worker(
        study_url, name, tmp_path, (interval, grace), host="elsewhere", slow_hold=grace + 3)

    assert values.tolist() == [_value(p) for p in PLANS]
    trials = recorder.study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(tuple(t.user_attrs["allocation"]) for t in complete) == sorted(PLANS)       # each once
    assert [t.state for t in trials if not t.state.is_finished()] == []
    assert len(failed) == 1 and failed[0].user_attrs[OWNER] == f"elsewhere:{killed_pid}" and interrupted(failed[0])
    lost = tuple(failed[0].user_attrs["allocation"])
    [retry] = [t for t in complete if tuple(t.user_attrs["allocation"]) == lost]
    requeued_after = (retry.datetime_start - killed_at).total_seconds()
    slow_trials = [t for t in complete if t.user_attrs[OWNER] == f"elsewhere:{slow_pid}"]
    held = max(t.duration.total_seconds() for t in slow_trials)
    # every plan was evaluated to the end once: by the coordinator or the live worker (the killed one's is lost)
    assert len(evaluated) + len(logs["slow"].read_text().split()) == len(PLANS)
    summary = (f"{study_url.split(':')[0]}: killed worker's plan taken again {requeued_after:.1f} s after the kill "
               f"(heartbeat {interval} s, grace {grace} s); the live worker held a trial {held:.1f} s")
    print(summary)
    record_property("liveness_remote", summary)
    assert held > grace, summary                                   # alive past the grace period: not failed
    # SQLite's clock has whole seconds and the coordinator checks once per interval; 3 s of slack for a busy machine
    assert requeued_after < grace + 2 * interval + 3, summary


def test_a_worker_dead_on_this_host_is_found_by_its_pid_at_once(study_url, tmp_path, record_property):
    """The same on this host with a grace period of a minute: the pid check fails the trial at once, so a killed
    run or worker here does not hold its plans for the grace period."""
    from allocopt.search.workers import ORPHANED

    interval, grace = 1, 60
    name = f"liveness-local-{study_url.split(':')[0]}"
    recorder, values, evaluated, killed_pid, _, killed_at, logs = _run_with_a_killed_worker(
        study_url, name, tmp_path, (interval, grace), host=None, slow_hold=0.0)

    assert values.tolist() == [_value(p) for p in PLANS]
    trials = recorder.study.get_trials(deepcopy=False)
    [failed] = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.user_attrs[ORPHANED] and str(killed_pid) in failed.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["allocation"] == failed.user_attrs["allocation"]]
    requeued_after = (retry.datetime_start - killed_at).total_seconds()
    record_property("liveness_local", f"{study_url.split(':')[0]}: plan taken again {requeued_after:.1f} s after the kill")
    assert requeued_after < 10 < grace
    assert sorted(tuple(t.user_attrs["allocation"]) for t in trials if t.state == TrialState.COMPLETE) == sorted(PLANS)
    assert len(evaluated) + len(logs["slow"].read_text().split()) == len(PLANS)


def test_a_result_that_comes_after_the_grace_period_is_dropped(study_url):
    """A worker alive but silent past the grace period (its heartbeat could not be written) loses its trial: the
    trial is FAILed as interrupted, its late result is refused, and the plan goes back to the queue once."""
    from allocopt.search.workers import interrupted, take_waiting, tell

    name = f"liveness-late-{study_url.split(':')[0]}"
    recorder = _coordinator(study_url, name, (1, 2))
    recorder.study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params={},
                                                       distributions={}, user_attrs=recorder.trial_attrs(PLANS[1], "toy")))
    [(trial_id, trial)] = take_waiting(recorder.queue, 1)         # claimed with one heartbeat, then silence
    deadline = time.monotonic() + 30
    while not recorder.queue.reap(force=True):
        assert time.monotonic() < deadline, "the silent trial was never failed"
        time.sleep(0.5)
    assert tell(recorder.queue, trial_id, trial, _value(PLANS[1])) is False
    [stale] = recorder.study.get_trials(deepcopy=False)
    assert stale.state == TrialState.FAIL and stale.values is None and interrupted(stale)

    values = recorder.wrap(lambda counts: [_value(row) for row in counts], "toy")(np.array([PLANS[1]]))
    assert values.tolist() == [_value(PLANS[1])]
    states = sorted(t.state.name for t in recorder.study.get_trials(deepcopy=False))
    assert states == ["COMPLETE", "FAIL"]


# ---- claims: one taker per WAITING trial, also where the database has no row locks (SQLite) ----------------------

_CLAIMER = """
import json, sys, time
from optuna.trial import TrialState
from allocopt.search.workers import join_study, take_waiting
queue = join_study(sys.argv[1], sys.argv[2])
while not __import__("os").path.exists(sys.argv[3]):
    time.sleep(0.01)                          # start together
got = []
while queue.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
    got += [t.number for _, t in take_waiting(queue, 1)]
print(json.dumps(got))
"""


def test_three_processes_claim_each_waiting_trial_exactly_once(study_url, tmp_path):
    """`--workers 3` on the default SQLite storage took the same WAITING trial in two processes (SQLite ignores the
    row lock a claim relies on), and one crashed on the other's finished trial; claims now serialise there."""
    name, plans = "claims", 60
    study = optuna.create_study(study_name=name, storage=study_url)
    dist = optuna.distributions.IntDistribution(0, 1000)
    for i in range(plans):
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params={"x": i}, distributions={"x": dist}))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, study_url, name, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(3)]
    time.sleep(3)                                     # every claimer has its study open
    go.write_text("")
    taken = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        taken.append(json.loads(out.strip().splitlines()[-1]))
    claimed = [n for got in taken for n in got]
    assert sorted(claimed) == list(range(plans)), collections.Counter(claimed).most_common(3)
    assert all(taken), taken                          # the work was shared
