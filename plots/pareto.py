"""ESAP vs expert-memory Pareto front of an nsga2 search, with hypervolume.

Usage: python plots/pareto.py STUDY_OR_RUN_DIR [--out DIR] [--storage URL --study NAME] [--ref-memory-gb X]

All logic lives in allocopt.plotting; `allocopt plot pareto` is the same command.
"""
from allocopt.cli.plot import run_script

if __name__ == "__main__":
    run_script("pareto")
