"""Best ESAP so far vs evaluations, one line per optimizer.

Usage: python plots/convergence.py STUDY_OR_RUN_DIR [...] [--out DIR] [--storage URL --study NAME]

All logic lives in allocopt.plotting; `allocopt plot convergence` is the same command.
"""
from allocopt.cli.plot import run_script

if __name__ == "__main__":
    run_script("convergence")
