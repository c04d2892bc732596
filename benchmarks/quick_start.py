"""The README's main job (`allocopt run --optimizer ga --criterion reap` on the testbed), timed under each of several
Python environments in one invocation: its wall-clock, peak RSS and result with the dependency versions each one has.

Use it to compare the newest releases a fresh install resolves with the versions the reports were measured with,
on the same machine at the same time (alternate runs with ``--repeat`` so drift in machine load hits both):

    python benchmarks/quick_start.py --python .venv/bin/python --python /tmp/venv-old/bin/python --repeat 2

Each run is a fresh subprocess with its own run directory and study (nothing is reused between runs); the
interpreter must have allocopt installed. Prints one Markdown table and, last, a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERSIONS = "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in %r}))"
PACKAGES = ("torch", "transformers", "optuna", "pymoo", "accelerate", "numpy")
MAIN_JOB = ["run", "--optimizer", "ga", "--criterion", "reap", "--quiet", "--json"]


def versions(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-c", VERSIONS % (PACKAGES,)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_once(python: str, out_dir: Path) -> dict:
    """One main job in a fresh process: wall-clock, the child's own peak RSS (wait4), and its summary line."""
    args = [python, "-m", "allocopt.cli.main", *MAIN_JOB, "--out", str(out_dir), "--name", out_dir.name]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)           # this child's own rusage (peak RSS), not all children's
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "search_s": summary["wall_time_s"], "value": summary["value"], "counts": summary["counts"],
            "evaluations": summary["evaluations"], "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="interpreter of an environment (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per environment, alternating")
    parser.add_argument("--work", type=Path, default=None, help="where run directories go [default: a temp dir]")
    args = parser.parse_args(argv)
    pythons = args.python or [sys.executable]
    work = args.work or Path(tempfile.mkdtemp(prefix="quick-start-"))
    envs = [{"python": p, "versions": versions(p), "runs": []} for p in pythons]
    for r in range(args.repeat):
        for i, env in enumerate(envs):
            result = run_once(env["python"], work / f"env{i}-run{r}")
            env["runs"].append(result)
            print(f"env {i} run {r}: {result['wall_s']:.1f} s wall, {result['value']:.5f} {result['counts']}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores, load average after the runs {load}\n")
    print("| environment | " + " | ".join(PACKAGES) + " | wall s (each run) | search s | peak RSS MB | value | counts |")
    print("|---|" + "---|" * len(PACKAGES) + "---|---|---|---|---|")
    for env in envs:
        runs = env["runs"]
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        searches = ", ".join(f"{r['search_s']:.1f}" for r in runs)
        print(f"| {env['python']} | " + " | ".join(env["versions"][p] for p in PACKAGES) +
              f" | {walls} | {searches} | {max(r['peak_rss_mb'] for r in runs):.0f} | {runs[-1]['value']:.5f} | "
              f"{runs[-1]['counts']} |")
    print(json.dumps(envs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
