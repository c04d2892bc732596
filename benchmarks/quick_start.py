"""The README's main job (`allocopt run --optimizer ga --criterion reap` on the testbed), timed in one invocation
under several Python environments, environment settings and machine loads: wall-clock, peak RSS and result.

Compare the newest releases a fresh install resolves with the versions the reports were measured with:

    python benchmarks/quick_start.py --python .venv/bin/python --python /tmp/venv-old/bin/python --repeat 2

or the main job on a quiet machine and beside competing CPU-bound processes (``--load N`` starts N busy-looping
processes for the duration of each run), under several settings:

    python benchmarks/quick_start.py --load 0 --load 1 --setting default= --setting passive=OMP_WAIT_POLICY=PASSIVE

Each run is a fresh subprocess with its own run directory and study (nothing is reused between runs); runs of the
different combinations alternate, so drift in the machine hits all of them. The interpreter must have allocopt
installed. Prints one Markdown table and, last, a JSON line.
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


def run_once(python: str, out_dir: Path, env: dict[str, str], load: int, extra: list[str]) -> dict:
    """One main job in a fresh process beside ``load`` busy-looping processes: wall-clock, the child's own peak RSS
    (wait4), and its summary line."""
    args = [python, "-m", "allocopt.cli.main", *MAIN_JOB, *extra, "--out", str(out_dir), "--name", out_dir.name]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        return _timed(args, {**os.environ, **env})
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _timed(args: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env)
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


def _setting(text: str) -> tuple[str, dict[str, str]]:
    """``passive=OMP_WAIT_POLICY=PASSIVE;OMP_NUM_THREADS=1`` -> ("passive", {...}); ``default=`` -> ("default", {})."""
    label, _, spec = text.partition("=")
    pairs = [p.partition("=") for p in spec.split(";") if p.strip()]
    return label, {k.strip(): v.strip() for k, _, v in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="interpreter of an environment (repeatable)")
    parser.add_argument("--setting", action="append", metavar="LABEL=[KEY=VALUE;...]",
                        help="environment variables for a variant of the run (repeatable), e.g. passive=OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--load", action="append", type=int, help="competing busy-looping processes (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per combination, alternating")
    parser.add_argument("--extra", default="", help="more `allocopt run` options, e.g. '--evals 60' (not the main job then)")
    parser.add_argument("--work", type=Path, default=None, help="where run directories go [default: a temp dir]")
    args = parser.parse_args(argv)
    pythons = args.python or [sys.executable]
    settings = [_setting(text) for text in (args.setting or ["default="])]
    work = args.work or Path(tempfile.mkdtemp(prefix="quick-start-"))
    envs = [{"python": p, "versions": versions(p), "setting": label, "env": env, "load": load, "runs": []}
            for p in pythons for label, env in settings for load in (args.load or [0])]
    for r in range(args.repeat):
        for i, env in enumerate(envs):
            result = run_once(env["python"], work / f"env{i}-run{r}", env["env"], env["load"], args.extra.split())
            env["runs"].append(result)
            print(f"{env['python']} {env['setting']} load {env['load']} run {r}: {result['wall_s']:.1f} s wall, "
                  f"{result['peak_rss_mb']:.0f} MB, {result['value']:.5f} {result['counts']}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores, load average after the runs {load}\n")
    print("| environment | setting | load | " + " | ".join(PACKAGES) + " | wall s (each run) | search s | peak RSS MB | "
          "value | counts |")
    print("|---|---|---|" + "---|" * len(PACKAGES) + "---|---|---|---|---|")
    for env in envs:
        runs = env["runs"]
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        searches = ", ".join(f"{r['search_s']:.1f}" for r in runs)
        print(f"| {env['python']} | {env['setting']} | {env['load']} | " + " | ".join(env["versions"][p] for p in PACKAGES) +
              f" | {walls} | {searches} | {max(r['peak_rss_mb'] for r in runs):.0f} | {runs[-1]['value']:.5f} | "
              f"{runs[-1]['counts']} |")
    print(json.dumps(envs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
