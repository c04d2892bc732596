"""Four processes share one search on a real PostgreSQL server: `allocopt run --workers 2` (itself and one
spawned worker) plus two `allocopt worker` processes started by hand. No plan may be evaluated twice or lost,
and the plan must equal a single-process SQLite run with the same seed (who evaluated a plan does not matter).

The queue hands out whole evaluations, so a shared search scores every plan on all rows: ga's racing falls back
(plan.json and the CLI say so), and the single-process reference runs with racing off to be the same search."""
from __future__ import annotations

import collections
import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from allocopt.search.runner import RACING_OFF_QUEUE
from postgres import postgres_url
from reliability_kit import allocopt, make_root, save_tiny_model, popen, run_args, sqlite_url, trial_counts

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
