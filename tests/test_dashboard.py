"""optuna-dashboard serves the study a real `allocopt run` wrote: the storage URL from plan.json is all it needs.

The dashboard is started as users start it (the `optuna-dashboard` console script on localhost) and read
through its JSON API, so the check covers the SQLite file, the study name, the per-trial user attrs and the race:
PRUNED trials with their intermediate values (partial ESAP by search rows scored), what the dashboard's
"Intermediate Values" view draws.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import optuna
import pytest

from reliability_kit import ENV, allocopt, make_root, run_args

NAME = "dash"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read())


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 60) -> dict:
    """The first JSON answer from ``url``, polling while the server starts up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"optuna-dashboard exited with {server.returncode}: {server.stderr.read()}")
        try:
            return _get_json(url)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    pytest.fail(f"optuna-dashboard did not answer {url} within {timeout} s")


@pytest.fixture(scope="module")
def run_storage(tmp_path_factory) -> str:
    root = make_root(tmp_path_factory.mktemp("dashboard"))
    # 16 search rows (4 micro-batches) so the default ga races: the study holds PRUNED trials with intermediate values
    done = allocopt(*run_args(root, NAME, "--optimizer", "ga", "--evals", "16", "--num-seqs", "16", "--seed", "1"))
    assert done.returncode == 0, done.stderr
    plan = json.loads((root / "runs" / NAME / "plan.json").read_text(encoding="utf-8"))
    assert plan["run_name"] == NAME
    return plan["storage"]


def test_dashboard_serves_the_run_study_over_http(run_storage):
    executable = shutil.which("optuna-dashboard")
    assert executable, "optuna-dashboard is a dependency of allocopt; its console script must be on PATH"
    study = optuna.load_study(study_name=NAME, storage=run_storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) >= 8

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([executable, run_storage, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        listed = _wait_for(f"{base}/api/studies", server)["study_summaries"]
        assert [s["study_name"] for s in listed] == [NAME]
        assert listed[0]["directions"] == ["maximize"]

        detail = _get_json(f"{base}/api/studies/{listed[0]['study_id']}")
        assert detail["name"] == NAME
        served = sorted(detail["trials"], key=lambda t: t["number"])
        assert len(served) == len(trials)
        for got, want in zip(served, sorted(trials, key=lambda t: t.number)):
            assert got["state"] == want.state.name.capitalize()
            attrs = {a["key"]: a["value"] for a in got["user_attrs"]}
            assert json.loads(attrs["allocation"]) == want.user_attrs["allocation"]
            assert float(got["values"][0]) == pytest.approx(want.values[0])
            steps = {int(iv["step"]): float(iv["value"]) for iv in got["intermediate_values"]}
            assert steps == pytest.approx(want.intermediate_values)         # the race, by rows scored
        pruned = [t for t in served if t["state"] == "Pruned"]
        assert pruned and all(t["intermediate_values"] for t in pruned)
        assert any(t["state"] == "Complete" and t["intermediate_values"] for t in served)   # raced survivors
        assert {"allocation", "kept", "memory_bytes"} <= {a["key"] for a in detail["union_user_attrs"]}
        assert len(detail["best_trials"]) == 1
        assert detail["best_trials"][0]["values"][0] == pytest.approx(study.best_value)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
