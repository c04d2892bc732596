"""Kill a real `allocopt run` with SIGKILL mid-search, rerun it with --resume, and compare with an uninterrupted run.

A resumed seeded optimizer replays its trajectory against the study (completed plans are served, never
re-evaluated) and continues, so it must end with exactly the plans and the plan.json of a run never killed.
"""
from __future__ import annotations

import json
import random
import signal
import time

import pytest

from reliability_kit import (allocopt, complete_allocations, make_root, popen, pruned_allocations, run_args,
                             sqlite_url, trial_counts)

# 16 search rows (4 micro-batches), so ga races: the killed study holds PRUNED trials the resumed run replays.
EVALS = ["--evals", "18", "--population", "6", "--seed", "7", "--num-seqs", "16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("resume"))


def _kill_when_complete(proc, storage: str, name: str, at_least: int, timeout: float = 600,
                        sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc`` as soon as the study holds ``at_least`` COMPLETE trials."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if trial_counts(storage, name)["complete"] >= at_least:
                break
        except (KeyError, Exception):                   # study or tables not created yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
    assert time.monotonic() < deadline, f"the run never reached {at_least} COMPLETE trials in {timeout} s"
    proc.send_signal(sig)
    proc.wait()
    if sig == signal.SIGINT:                               # Ctrl-C: one line that says how to go on, exit 130
        assert proc.returncode == 130 and "run the same command again to resume" in proc.stderr.read()


@pytest.mark.parametrize("optimizer", ["ga", "nsga2", "cmaes"])
def test_killed_search_resumes_to_the_uninterrupted_plan(root, optimizer, record_property):
    ref = allocopt(*run_args(root, f"ref-{optimizer}", "--optimizer", optimizer, *EVALS))
    assert ref.returncode == 0, ref.stderr

    name = f"kill-{optimizer}"
    storage = sqlite_url(root, name)
    total = trial_counts(sqlite_url(root, f"ref-{optimizer}"), f"ref-{optimizer}")["complete"]
    assert total >= 6, f"the reference run completed {total} trials: too few to kill one mid-search"
    # mid-search, whatever the optimizer spends: in its first half, so that on a busy machine the signal (sent when the
    # test's polling of the study sees the count) still lands before the run ends (ga races: 7 of 18 plans complete)
    at = random.Random().randint(2, max(2, min(12, total // 2)))
    sig = signal.SIGINT if optimizer == "ga" else signal.SIGKILL                       # Ctrl-C, or no goodbye
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; under a shell's background job (CI) the
    # test process may inherit it ignored, and so would the run.
    proc = popen(*run_args(root, name, "--optimizer", optimizer, *EVALS),
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _kill_when_complete(proc, storage, name, at, sig=sig)
    before = trial_counts(storage, name)
    plans_before = complete_allocations(storage, name)

    resumed = allocopt(*run_args(root, name, "--optimizer", optimizer, "--resume", *EVALS))
    assert resumed.returncode == 0, resumed.stderr
    after = trial_counts(storage, name)
    plans_after = complete_allocations(storage, name)
    lost = len(plans_before - plans_after)
    counts = (f"{optimizer}: killed at {before['complete']} COMPLETE ({before['running']} RUNNING); after resume "
              f"{after['complete']} COMPLETE, {after['distinct']} distinct, {after['fail']} FAIL (orphans), "
              f"lost {lost}, duplicated {after['duplicated']}")
    print(counts)
    record_property("resume_counts", counts)

    assert lost == 0 and after["duplicated"] == 0, counts
    assert after["running"] == 0 and after["waiting"] == 0, counts
    assert after["fail"] == before["running"], counts            # the killed run's in-flight trials, never counted
    ref_storage = sqlite_url(root, f"ref-{optimizer}")
    assert plans_after == complete_allocations(ref_storage, f"ref-{optimizer}"), counts
    plan = json.loads((root / "runs" / name / "plan.json").read_text())
    ref_plan = json.loads((root / "runs" / f"ref-{optimizer}" / "plan.json").read_text())
    assert plan["layers"] == ref_plan["layers"] and plan["esap"] == ref_plan["esap"], counts
    assert plan["evaluations"] == ref_plan["evaluations"]
    assert plan["pruned"] == ref_plan["pruned"] and plan["evaluation_equivalents"] == ref_plan["evaluation_equivalents"]
    assert pruned_allocations(storage, name) == pruned_allocations(ref_storage, f"ref-{optimizer}"), counts
    # bookkeeping of the resumed call: what came from the study is said, the killed call's time is counted
    assert plan["new_evaluations"] < plan["evaluations"] and "of them from the study" in resumed.stdout, resumed.stdout
    assert plan["wall_time_s"] > plan["wall_time_call_s"] and "s over all calls" in resumed.stdout
    assert plan["evaluation_equivalents"] >= plan["evaluations"] > 0                # nsga2 wrote 0.0 here
    if optimizer == "ga":
        assert plan["pruned"] > 0, counts                         # the race really ran, and resumed


def test_resume_without_a_study_is_refused(root):
    (root / "runs").mkdir(exist_ok=True)        # the study's folder exists (else its own refusal comes first)
    out = allocopt(*run_args(root, "never-ran", "--resume", *EVALS))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no study 'never-ran'" in out.stderr
    assert not (root / "runs" / "never-ran").exists()


def test_an_interrupted_command_exits_130_in_one_line(monkeypatch):
    """Ctrl-C in any command (here while `info` loads its model) ends with exit 130 and one line, as `run` does,
    not click's "Aborted!" with exit 1."""
    import allocopt.runtime
    from click.testing import CliRunner

    from allocopt.cli.main import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(allocopt.runtime, "load_model", interrupted)
    result = CliRunner().invoke(cli, ["info", "--model", "testbed"])
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted: allocopt info stopped", result.output
