"""Per-layer kept-expert density (kept / E) of one or more plans.

Usage: python plots/density.py RUN_DIR_OR_PLAN [RUN_DIR_OR_PLAN ...] [--out DIR]

All logic lives in allocopt.plotting; `allocopt plot density` is the same command.
"""
from allocopt.cli.plot import run_script

if __name__ == "__main__":
    run_script("density")
