"""Plots of a search: Pareto front (nsga2), per-layer density of plans, convergence of optimizers.

Each ``plot_*`` writes a PNG plus the data behind it (CSV, JSON summary) atomically and returns their paths;
``plots/*.py`` and ``allocopt plot`` are thin wrappers over these functions.
"""
from allocopt.plotting.convergence import plot_convergence
from allocopt.plotting.density import plot_density
from allocopt.plotting.pareto import hypervolume, non_dominated, plot_pareto
from allocopt.plotting.sources import resolve_sources

__all__ = ["plot_convergence", "plot_density", "plot_pareto", "hypervolume", "non_dominated", "resolve_sources"]
