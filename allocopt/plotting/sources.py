"""Where plot data comes from: a run directory, a SQLite ``.db`` file or an Optuna storage URL -> studies.

Every evaluation of a search is an Optuna trial (see ``allocopt.search.study``), so plots read the study rather
than a private log; the run directory adds what only the run knows (``plan.json``: uniform ESAP, experts per layer;
``front.json`` for nsga2).

Example::

    [src] = resolve_sources(["studies/my-run"])
    evals = src.evaluations()          # trial-number (= evaluation) order
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from allocopt.errors import AllocoptError
from allocopt.io import read_json
from allocopt.pipeline.run import FRONT_FILE
from allocopt.plan import PLAN_FILE, Plan
from allocopt.search.study import (
    ALLOCATION,
    CONSTRAINTS,
    LAYER_TOKENS,
    MEMORY_BYTES,
    OPTIMIZER,
    ROW_SUMS,
    UNIFORM,
)

STUDY_POINTER = "study.json"       # optional {"storage", "study_name"} a run may write beside plan.json
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


@dataclass(frozen=True)
class Evaluation:
    """One evaluated allocation, as a plot needs it."""
    number: int                      # trial number (evaluation order within its study)
    esap: float                      # NaN when the evaluation failed (or was pruned: a partial value is no result)
    memory_bytes: float              # NaN when not recorded
    counts: tuple[int, ...]          # kept experts per MoE layer (a --bits study: then bit-width option per layer)
    optimizer: str
    uniform: bool                    # the trial says it is the uniform plan
    pruned: bool = False             # lost a race: scored on ``rows`` search rows only
    rows: int | None = None          # search rows scored (None: not recorded)
    layer_tokens: float = math.nan   # decoder layer-tokens forwarded for it (NaN: not recorded)
    seconds: float = math.nan        # when it finished, in seconds since the study's first trial started
    off_budget: bool = False         # keeps more or fewer experts than the run's budget (a sensitivity probe)
    feasible: bool | None = None     # Optuna's own constraints of the trial (all <= 0); None: not recorded


@dataclass(frozen=True)
class StudyRef:
    storage: str
    study_name: str


@dataclass(frozen=True)
class Source:
    """One study and/or one run directory; ``name`` labels it in legends."""
    name: str
    study: StudyRef | None = None
    run_dir: Path | None = None

    @cached_property
    def plan(self) -> Plan | None:
        path = self.run_dir / PLAN_FILE if self.run_dir else None
        return Plan.load(path) if path and path.is_file() else None

    @property
    def front_file(self) -> Path | None:
        path = self.run_dir / FRONT_FILE if self.run_dir else None
        return path if path and path.is_file() else None

    @cached_property
    def _study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        assert self.study is not None
        try:
            return optuna.load_study(study_name=self.study.study_name, storage=self.study.storage)
        except KeyError as exc:
            raise AllocoptError(f"study {self.study.study_name!r} is not in {self.study.storage}; "
                                f"pass --study with one of {_study_names(self.study.storage)}") from exc

    @property
    def directions(self) -> list[str]:
        return [d.name.lower() for d in self._study.directions] if self.study else []

    @property
    def study_attrs(self) -> dict[str, Any]:
        return dict(self._study.user_attrs) if self.study else {}

    def evaluations(self, pruned: bool = False) -> list[Evaluation]:
        """Completed and failed trials in evaluation order (running/waiting trials are not evaluations yet); with
        ``pruned`` also the plans racing pruned (their compute counts, their partial values never do)."""
        if self.study is None:
            raise AllocoptError(f"{self.name} has no Optuna study; pass the run directory next to its .db, "
                                "a .db file, or --storage URL --study NAME")
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.FAIL) + ((TrialState.PRUNED,) if pruned else ())
        trials = sorted(self._study.get_trials(deepcopy=False, states=states), key=lambda t: t.number)
        start = min((t.datetime_start for t in trials if t.datetime_start is not None), default=None)
        evals = [_to_evaluation(t, start) for t in trials]
        if not evals:
            raise AllocoptError(f"study {self.study.study_name!r} in {self.study.storage} has no finished trials; "
                                "run a search first (`allocopt run`) or point at another study")
        return evals

    @property
    def uniform_esap(self) -> float | None:
        """The uniform plan's value of the run's objective: from plan.json, else from a trial marked uniform."""
        uniform = self.plan.objective_value()[2] if self.plan is not None else None
        if uniform is not None:
            return uniform
        if self.study is None:
            return None
        found = [e.esap for e in self.evaluations() if e.uniform and math.isfinite(e.esap)]
        return max(found) if found else None


def _to_evaluation(trial, start=None) -> Evaluation:
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    pruned = trial.state == TrialState.PRUNED
    values = trial.values or []
    esap = float(values[0]) if values and not pruned else math.nan
    memory = float(values[1]) if len(values) > 1 else float(attrs.get(MEMORY_BYTES, math.nan))
    optimizer = str(attrs.get(OPTIMIZER, "unknown"))
    rows = len(attrs[ROW_SUMS]) if ROW_SUMS in attrs else None
    seconds = (trial.datetime_complete - start).total_seconds() if start is not None and trial.datetime_complete else math.nan
    constraints = trial.system_attrs.get(CONSTRAINTS)
    feasible = None if constraints is None else all(float(c) <= 0 for c in constraints)
    return Evaluation(trial.number, esap, memory, tuple(int(c) for c in attrs.get(ALLOCATION, ())), optimizer,
                      bool(attrs.get(UNIFORM, False)) or optimizer == "uniform", pruned, rows,
                      float(attrs.get(LAYER_TOKENS, math.nan)), seconds, feasible=feasible)


def _study_names(storage: str) -> list[str]:
    import optuna

    try:
        return optuna.get_all_study_names(storage)
    except Exception as exc:   # SQLAlchemy/driver errors vary by backend; all mean "cannot read this storage"
        raise AllocoptError(f"cannot read Optuna storage {storage} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            "check the URL and that the database is reachable") from exc


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def _check_storage(url: str) -> str:
    """A study to read must exist (Optuna would create an empty one) and pass the run's own storage checks."""
    from allocopt.search.study import check_storage

    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.is_file():
            raise AllocoptError(f"SQLite study file {path} does not exist; pass the .db written by `allocopt run`")
    check_storage(url)
    return url


def _run_dir_study(run_dir: Path) -> StudyRef | None:
    """The run's study: ``study.json`` if written, else plan.json's ``storage`` + ``run_name`` (what
    `allocopt run` records), else the sibling ``<run>.db`` named after the run."""
    pointer = run_dir / STUDY_POINTER
    if pointer.is_file():
        fix = 'it must hold {"storage", "study_name"}'
        obj = read_json(pointer, str(pointer), fix)
        try:
            return StudyRef(_check_storage(str(obj["storage"])), str(obj["study_name"]))
        except (KeyError, TypeError) as exc:
            raise AllocoptError(f"{pointer} is malformed ({exc!r}); {fix}") from exc
    plan_path = run_dir / PLAN_FILE
    if plan_path.is_file():
        extra = Plan.load(plan_path).extra
        if extra.get("storage") and extra.get("run_name"):
            return StudyRef(_check_storage(str(extra["storage"])), str(extra["run_name"]))
    for db in (run_dir.parent / f"{run_dir.name}{s}" for s in _DB_SUFFIXES):
        if db.is_file():
            return StudyRef(_sqlite_url(db), run_dir.name)
    inside = [p for p in sorted(run_dir.iterdir()) if p.suffix in _DB_SUFFIXES]
    return StudyRef(_sqlite_url(inside[0]), run_dir.name) if len(inside) == 1 else None


def _storage_sources(url: str, study_name: str | None) -> list[Source]:
    names = _study_names(_check_storage(url))
    if study_name is not None:
        if study_name not in names:
            raise AllocoptError(f"study {study_name!r} is not in {url}; pass --study with one of {names}")
        names = [study_name]
    if not names:
        raise AllocoptError(f"{url} holds no studies; run a search first (`allocopt run`)")
    return [Source(n, StudyRef(url, n)) for n in names]


def resolve_source(target: str, study_name: str | None = None) -> list[Source]:
    """One command-line target -> its sources (a storage holding several studies gives several)."""
    if "://" in target:
        return _storage_sources(target, study_name)
    path = Path(target)
    if path.is_file() and path.suffix in _DB_SUFFIXES:
        return _storage_sources(_sqlite_url(path), study_name)
    if path.is_file() and path.name in (PLAN_FILE, FRONT_FILE, STUDY_POINTER):
        path = path.parent
    if path.is_dir():
        ref = _run_dir_study(path)
        if study_name is not None and ref is not None:
            ref = StudyRef(ref.storage, study_name)
        return [Source(path.resolve().name, ref, path)]
    if not path.exists():
        raise AllocoptError(f"{target} does not exist; pass a run directory, a .db file or a storage URL")
    raise AllocoptError(f"{target} is neither a run directory, a SQLite .db file nor a storage URL; pass one of those")


def resolve_sources(targets: Sequence[str], storage: str | None = None, study_name: str | None = None) -> list[Source]:
    """All targets plus the ``--storage/--study`` pair; at least one source or AllocoptError."""
    sources = [s for t in targets for s in resolve_source(t, study_name if storage is None else None)]
    if storage is not None:
        sources += _storage_sources(storage, study_name)
    if not sources:
        raise AllocoptError("no study given; pass a run directory, a .db file, a storage URL or --storage URL --study NAME")
    return sources
