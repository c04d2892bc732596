"""`allocopt run --workers N` on the default SQLite storage, repeated: crashes (a non-zero exit, a traceback from a
worker) and duplicate evaluations (one plan COMPLETE twice), counted over every run.

    python benchmarks/workers_sqlite.py --runs 10 --workers 3 --evals 40

Each run is a fresh study in its own folder on the testbed; the last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--evals", type=int, default=40)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="workers-sqlite-"))
    rows = []
    for i in range(args.runs):
        name = f"w{i}"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "allocopt.cli.main", "run", "--optimizer", "ga", "--criterion", "reap",
                               "--workers", str(args.workers), "--evals", str(args.evals), "--seed", str(i),
                               "--out", str(work / name), "--name", name, "--quiet"], capture_output=True, text=True)
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{work / name}.db")
        complete = [tuple(t.user_attrs["allocation"]) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        duplicates = sum(n - 1 for n in collections.Counter(complete).values() if n > 1)
        crashed = proc.returncode != 0 or "Traceback" in proc.stderr
        rows.append({"run": i, "exit": proc.returncode, "crashed": crashed, "complete": len(complete),
                     "duplicates": duplicates, "seconds": round(time.perf_counter() - start, 1),
                     "error": proc.stderr.strip().splitlines()[-1] if crashed and proc.stderr.strip() else ""})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"runs": args.runs, "workers": args.workers, "crashes": sum(r["crashed"] for r in rows),
               "duplicate_evaluations": sum(r["duplicates"] for r in rows), "seconds": sum(r["seconds"] for r in rows)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
