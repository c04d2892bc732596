"""Figures and their data, written atomically so a crashed plot never leaves a half-written PNG or CSV.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state), so plotting
works headless and inside long-lived processes.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure

from allocopt.io import atomic_write_bytes, atomic_write_json, atomic_write_text

FIGSIZE = (7.0, 4.5)   # inches; at DPI this is 1050x675 px, readable in a report or a terminal image viewer
DPI = 150


def new_figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def save_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def save_json(path: Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def counts_field(counts: Sequence[int]) -> str:
    """Allocation as one CSV cell ("4 6 8 ..."): spaces keep it a single column without quoting."""
    return " ".join(str(int(c)) for c in counts)


PLOTS_SUBDIR = "plots"   # a run's figures land in <run dir>/plots, beside plan.json


def default_out_dir(run_dir: Path | None) -> Path:
    """``<run dir>/plots``; without a run directory (bare storage, loose plan file), ``<STUDIES_DIR>/plots``."""
    from allocopt.defaults import STUDIES_DIR

    return (run_dir if run_dir is not None else Path(STUDIES_DIR)) / PLOTS_SUBDIR
