"""`allocopt run` as a library call: checks -> :func:`~allocopt.pipeline.prepare` -> optimizer -> plan.json.

Work that costs nothing comes first (config and budget checks), so an impossible request fails before any
weights load. Every evaluated plan is an Optuna trial, so re-running the same command evaluates nothing twice.

    result = run_search(RunConfig.from_sources("problems/testbed-50.toml"))
    result.summary["value"], result.summary["uniform_value"], result.plan_path
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.io import LOCK_FILE, atomic_write_json, exclusive, output_dir
from allocopt.pipeline.prepare import check_request, memory_budget, prepare
from allocopt.pipeline.worker import recorder_for, uses_queue, workers_for
from allocopt.plan import PLAN_FILE, Plan

FRONT_FILE = "front.json"


@dataclass
class RunResult:
    config: RunConfig
    summary: dict[str, Any]          # plan.json's top-level fields (everything but "layers")
    plan_path: Path
    front_path: Path | None          # nsga2 only
    new_evaluations: int             # plans this call scored, its workers included (0 when the study had them all)
    calibration_reused: bool
    trace: list[dict[str, float]]    # after each batch the optimizer evaluated: budget spent, engine layer-tokens,
                                     # seconds since the evaluator was ready, best value (benchmarks/search_efficiency.py)
    total_experts: int = 0           # routed experts of the unpruned model (the sparsity's denominator)
    fixed_allocation: bool = False   # the optimizer is a search-free allocation (uniform, global, grape)


def run_search(config: RunConfig, progress: bool = True) -> RunResult:
    """Search the allocation described by ``config`` and write ``plan.json`` (and ``front.json``) to its run dir."""
    from allocopt.search.study import check_storage, sqlite_file

    start = time.perf_counter()
    source, _ = check_request(config)
    check_run_dir(config)
    with output_dir(config.run_dir) as run_dir, contextlib.ExitStack() as held:
        held.enter_context(exclusive(run_dir / LOCK_FILE, f"run directory {run_dir}", "an allocopt run writing there",
                                     "wait for it to finish, or pass another --out"))
        database = sqlite_file(config.storage_url)       # the default study database lives beside the run dir
        if database is not None:                         # a study of any run dir; servers serialise their own writes
            held.enter_context(exclusive(database.with_name(f"{database.name}.{config.name}.lock"),
                                         f"study {config.name} in {database}", "an allocopt run searching it",
                                         "wait for it to finish, or pass another --name"))
        check_storage(config.storage_url)
        return _search(config, source, run_dir, progress, start)


def check_run_dir(config: RunConfig) -> None:
    """Refuse a run directory that holds another run's plan.json (another ``run_name``): the run would replace it.
    The same run again (a resumed or repeated search) writes its plan there as before."""
    path = config.run_dir / PLAN_FILE
    if not path.is_file():
        return
    try:
        owner = json.loads(path.read_text(encoding="utf-8")).get("run_name")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != config.name:
        held = f"run {owner!r}" if isinstance(owner, str) else "a run allocopt cannot name"
        raise AllocoptError(f"--out {config.run_dir} holds the plan.json of {held}, which this run ({config.name!r}) "
                            "would replace; pass another --out, or delete that plan.json first")


def _search(config: RunConfig, source, run_dir: Path, progress: bool, start: float) -> RunResult:
    from allocopt.models.adapter import legacy_fingerprint
    from allocopt.search.fidelity import RowGrid
    from allocopt.search.optimizers import SearchContext, get_optimizer

    def same_model(info, model) -> None:                 # before calibration: a study of other weights is refused
        check_resumable(config, {"model_fingerprint": info.fingerprint}, None, legacy=lambda: legacy_fingerprint(model))

    prepared = prepare(config, progress=progress, source=source, save_statistics=False, check_model=same_model)
    if prepared.joint is not None:
        return _joint_search(config, prepared, run_dir, progress, start)
    info, space, evaluator, ranking = prepared.info, prepared.space, prepared.evaluator, prepared.ranking
    search_space = space.lattice()        # in units of group-count experts where routing is group-limited
    ready = time.perf_counter()
    values: dict[tuple[int, ...], Any] = {}

    def evaluate_plans(counts: np.ndarray, rows: int | None = None) -> list[Any]:
        """counts [n, L] -> objective values on the first ``rows`` search rows (None: all, the full value); kept ids
        of layer l are the first counts[l] of its ranking."""
        kept = [prepared.kept_for(row) for row in np.asarray(counts)]
        out = evaluator.evaluate(kept, rows=rows)
        if rows is None:
            values.update({tuple(int(c) for c in row): v for row, v in zip(np.asarray(counts), out)})
        return out

    attrs = study_attrs(config, prepared, space)
    optimizer = get_optimizer(config.optimizer)
    directions, metrics = [evaluator.direction], [config.objective]
    if optimizer.memory_objective:                 # the dashboard's Pareto view: objective vs expert memory
        directions, metrics = directions + ["minimize"], metrics + ["memory_bytes"]
    check_resumable(config, attrs, directions, legacy=lambda: legacy_fingerprint(prepared.model))
    rows = None if uses_queue(config) else RowGrid(evaluator.num_rows, evaluator.rows_for(1))
    optimizer.check_budget(search_space, config.max_evals, dict(config.options), rows)    # before anything is written
    prepared.save_statistics()
    recorder = recorder_for(config, directions, attrs, metrics, space=space, ranking=ranking)
    recorded = recorder.wrap(evaluate_plans, optimizer=config.optimizer)
    sign = 1.0 if evaluator.direction == "maximize" else -1.0     # optimizers maximise; the study keeps true values

    clock = CallClock(recorder.study, start)
    completed_before = len(recorder.completed())      # plans the study had scored before this call (resume)

    def evaluate(units: np.ndarray) -> np.ndarray:
        """Optimizers search ``search_space`` (counts in units); the study and the plans are in experts."""
        values = sign * recorded(space.expand(units))
        clock.record()
        if prepared.threads is not None:
            prepared.threads.adjust()                # follow the machine's load (at most every few seconds)
        return values

    # Racing scores plans on the first rows of the search set; the queue of a multi-process search (workers.py)
    # hands out whole evaluations only, so there every plan is scored on all rows.
    fidelity = None if rows is None else StudyFidelity(recorded, space.expand, sign, rows.rows, rows.step)
    uniform = search_space.uniform()
    uniform_value = float(evaluate(uniform[None, :])[0])
    trace = [{"equivalents": 0.0, "layer_tokens": evaluator.counters["layer_tokens"],
              "seconds": time.perf_counter() - ready, "best": sign * uniform_value}]
    with workers_for(config, recorder), _progress_bar(config.max_evals, sign, progress) as on_generation:
        traced = _tracer(trace, evaluator, ready, sign, on_generation)

        ctx = SearchContext(space=search_space, evaluate=evaluate, seed=config.seed, max_evals=config.max_evals,
                            population=config.population, ranking=ranking, scores=prepared.scores,
                            stats=prepared.stats, on_generation=traced, options=dict(config.options),
                            expert_space=space, fidelity=fidelity)
        result = optimizer.run(ctx)

    # A search also saw the uniform plan, so it never hands back something worse than that baseline; a fixed
    # allocation (uniform, global, grape) is reported as it is, even where uniform scores higher.
    best, best_value = space.expand(result.best), float(result.best_value)
    uniform = space.expand(uniform)
    if not optimizer.fixed_allocation and not best_value >= uniform_value:
        best, best_value = uniform, uniform_value
    counts = {l: int(c) for l, c in zip(space.layers, best)}
    total = int(space.num_experts.sum())
    summary = {
        **objective_fields(config.objective, sign * best_value, sign * uniform_value),
        "evaluations": int(result.evaluations),
        "evaluation_equivalents": round(float(result.spent), 4),
        "pruned": int(result.pruned),
        "search_phases": result.phases or None,
        "racing": racing_note(optimizer, ctx),
        "optimizer": config.optimizer,
        "criterion": config.criterion,
        "bound": _bound(values, recorder, best),
        "seed": config.seed,
        "model": config.model,
        **scoring_fields(config),
        "sparsity": 1.0 - int(best.sum()) / total,
        "counts": [int(c) for c in best],
        "count_multiple": config.count_multiple,
        "allowed_counts": list(space.allowed) or None,
        **_memory_fields(config, prepared.size, counts),
        "run_name": config.name,
        "storage": config.storage_url,
        # plans this call scored, in this process or its workers; the other evaluations came from the study
        "new_evaluations": max(0, len(recorder.completed()) - completed_before),
        "from_study": len(recorded.served),          # plans answered by trials of earlier calls (a resumed study)
        **clock.record(),
    }
    plan = Plan.from_counts(info.fingerprint, ranking, info.num_experts, counts)
    plan.extra.update(summary)
    plan_path = plan.save(run_dir / PLAN_FILE)
    summary = {k: v for k, v in plan.to_json().items() if k != "layers"}
    front_path = None
    if result.front is not None:
        front_path = atomic_write_json(run_dir / FRONT_FILE, {
            "objective": config.objective, "model_fingerprint": info.fingerprint, "layers": list(space.layers),
            "points": [{"counts": [int(c) for c in counts], "value": sign * float(v),
                        "memory_bytes": int(space.memory_bytes(counts))}
                       for counts, v in ((space.expand(x), v) for x, v, _ in result.front)]})
    return RunResult(config, summary, plan_path, front_path, summary["new_evaluations"], prepared.calibration_reused, trace,
                     total_experts=total, fixed_allocation=optimizer.fixed_allocation)


def _tracer(trace: list[dict[str, float]], evaluator, ready: float, sign: float,
            on_generation: Callable[[float, float], None] | None) -> Callable[[float, float], None]:
    """``on_generation`` for a search: appends (equivalents, engine layer-tokens, seconds, best) to ``trace`` after
    each batch, then updates the progress bar."""
    def traced(spent: float, best: float) -> None:
        trace.append({"equivalents": float(spent), "layer_tokens": evaluator.counters["layer_tokens"],
                      "seconds": time.perf_counter() - ready, "best": sign * best})
        if on_generation is not None:
            on_generation(spent, best)
    return traced


def study_attrs(config: RunConfig, prepared, space, budget: int | None = None) -> dict[str, Any]:
    """What a study records of its search (and what a resumed search must share: ``_SAME_FOR_RESUME``)."""
    return {"model": config.model, "model_fingerprint": prepared.info.fingerprint,
            "calibration_fingerprint": prepared.stats.data_fingerprint,
            "search_fingerprint": prepared.tokens.fingerprint(), "criterion": config.criterion,
            "objective": config.objective, "tolerance": config.tolerance, "seed": config.seed,
            "budget": int(space.budget if budget is None else budget), "layers": list(space.layers),
            "count_multiple": config.count_multiple, "allowed_counts": list(space.allowed) or None}


def _memory_fields(config: RunConfig, size, counts: dict[int, int], bits: dict[int, int] | None = None) -> dict[str, Any]:
    """A budget in bytes: what it was and what the plan's export weighs (its tensors' bytes, as written)."""
    if size is None:
        return {}
    return {"memory_budget_bytes": memory_budget(config, size), "export_bytes": size.bytes(counts, bits),
            "full_export_bytes": size.full}


def _joint_search(config: RunConfig, prepared, run_dir: Path, progress: bool, start: float) -> RunResult:
    """``--bits``: each layer's (kept count, bit-width) searched together under the byte budget
    (``search.joint.joint_search``: uniform-both plans, the knapsack DP warm start, a GA; with ``nsga2``
    ``joint_front``: ESAP against the export's bytes, front.json), every plan a trial of the study (params: counts and
    bit-width options), plan.json with each layer's bits."""
    from allocopt.search.optimizers import get_optimizer

    from allocopt.search.joint import joint_front, joint_options, joint_search

    info, joint, evaluator, ranking = prepared.info, prepared.joint, prepared.evaluator, prepared.ranking
    front_search = get_optimizer(config.optimizer).memory_objective      # nsga2: ESAP against the export's bytes
    options = joint_options(config.optimizer, config.options)
    ready = time.perf_counter()
    values: dict[tuple[int, ...], Any] = {}

    def evaluate_plans(plans: np.ndarray, rows: int | None = None) -> list[Any]:
        """Joint plans [n, 2L] -> objective values on the first ``rows`` search rows (None: all, the full value)."""
        out = evaluator.evaluate([joint.plan(x, info.fingerprint, ranking) for x in np.asarray(plans)], rows=rows)
        if rows is None:
            values.update({tuple(int(c) for c in x): v for x, v in zip(np.asarray(plans), out)})
        return out

    attrs = {**study_attrs(config, prepared, joint.counts, budget=joint.budget), BITS_ATTR: [b or 0 for b in joint.bits],
             "total_expert_bytes": int(prepared.size.full)}          # the plots' memory axis: the export's bytes
    directions, metrics = [evaluator.direction], [config.objective]
    if front_search:
        directions, metrics = directions + ["minimize"], metrics + ["memory_bytes"]
    check_resumable(config, attrs, directions)
    prepared.save_statistics()
    recorder = recorder_for(config, directions, attrs, metrics, space=joint, ranking=ranking)
    recorded = recorder.wrap(evaluate_plans, optimizer=config.optimizer)
    sign = 1.0 if evaluator.direction == "maximize" else -1.0
    clock = CallClock(recorder.study, start)
    completed_before = len(recorder.completed())
    trace: list[dict[str, float]] = []
    racing = getattr(options, "racing", False)
    fidelity = None if uses_queue(config) or not racing else StudyFidelity(
        recorded, lambda plans: plans, sign, evaluator.num_rows, evaluator.rows_for(1))
    with workers_for(config, recorder), _progress_bar(config.max_evals, sign, progress) as on_generation:
        traced = _tracer(trace, evaluator, ready, sign, on_generation)

        def evaluate(plans: np.ndarray) -> np.ndarray:
            out = sign * recorded(plans)
            clock.record()
            return out

        if front_search:
            front, cache = joint_front(evaluate, joint, config.max_evals, config.seed, config.population)
            best, best_value = max(((x, v) for x, v, _ in front), key=lambda t: t[1])
        else:
            front = None
            best, best_value, cache = joint_search(evaluate, joint, config.max_evals, config.seed, options, fidelity,
                                                   on_generation=traced)
    uniform = [x for x in joint.uniform_both() if tuple(int(v) for v in x) in cache.values]
    uniform_value = max((cache.values[tuple(int(v) for v in x)] for x in uniform), default=float("nan"))
    plan = joint.plan(best, info.fingerprint, ranking)
    counts = dict(zip(joint.layers, plan.counts))
    total = int(joint.counts.num_experts.sum())
    summary = {
        **objective_fields(config.objective, sign * float(best_value), sign * float(uniform_value)),
        "uniform_plan": "the best plan of one count and one bit-width in every layer within the budget",
        "evaluations": int(cache.evaluations),
        "evaluation_equivalents": round(float(cache.spent), 4),
        "pruned": len(cache.pruned),
        "search_phases": {k: {m: round(v, 4) for m, v in row.items()} for k, row in cache.phases.items()} or None,
        "optimizer": config.optimizer, "criterion": config.criterion,
        "racing": _racing_note(racing, fidelity),
        "bound": _bound(values, recorder, best), "seed": config.seed, "model": config.model, **scoring_fields(config),
        "sparsity": 1.0 - sum(plan.counts) / total, "counts": plan.counts,
        "bits": [lp.bits for lp in plan.layers], "bit_options": list(joint.bits),
        "quantization": {"format": "compressed-tensors pack-quantized", "type": "int", "symmetric": True,
                         "strategy": "group", "group_size": evaluator.scheme.group_size},
        "count_multiple": config.count_multiple, "allowed_counts": list(joint.counts.allowed) or None,
        **_memory_fields(config, prepared.size, counts, plan.bits),
        "run_name": config.name, "storage": config.storage_url,
        "new_evaluations": max(0, len(recorder.completed()) - completed_before),
        "from_study": len(recorded.served),          # plans answered by trials of earlier calls (a resumed study)
        **clock.record(),
    }
    plan.extra.update(summary)
    plan_path = plan.save(run_dir / PLAN_FILE)
    summary = {k: v for k, v in plan.to_json().items() if k != "layers"}
    front_path = None
    if front is not None:
        front_path = atomic_write_json(run_dir / FRONT_FILE, {
            "objective": config.objective, "model_fingerprint": info.fingerprint, "layers": list(joint.layers),
            "memory": "export bytes (every tensor the export writes, packed experts included)",
            "points": [{"counts": [int(c) for c in joint.split(x)[0]],
                        "bits": [joint.bits[int(j)] for j in joint.split(x)[1]],
                        "value": sign * float(v), "memory_bytes": int(b)} for x, v, b in front]})
    return RunResult(config, summary, plan_path, front_path, summary["new_evaluations"], prepared.calibration_reused,
                     trace, total_experts=total)


def scoring_fields(config: RunConfig) -> dict[str, Any]:
    """plan.json's record of the data a plan was searched on: what `allocopt esap --plan` reads back to score it as
    the search did (``SCORING_FIELDS``), and the calibration data its ranking came from."""
    return {key: getattr(config, key) for key in (*SCORING_FIELDS, "calib_data")}


# RunConfig fields besides the objective that a plan's stored value depends on (recorded in plan.json).
SCORING_FIELDS = ("search_data", "search_seq_len", "search_num_seqs", "tolerance")


def objective_fields(objective: str, value: float, uniform_value: float) -> dict[str, Any]:
    """plan.json's record of what was optimised: the objective's name, the plan's and the uniform plan's values as
    ``value``/``uniform_value``, and again under the objective's own name (``esap``/``uniform_esap`` for ESAP,
    ``kl_pq``/``uniform_kl_pq`` for KL, ...). Read them back with :meth:`allocopt.plan.Plan.objective_value`."""
    return {"objective": objective, "value": value, "uniform_value": uniform_value, objective: value,
            f"uniform_{objective}": uniform_value}


# ---- racing -----------------------------------------------------------------------------------------

class StudyFidelity:
    """``SearchContext.fidelity`` of a single-process run: partial scores through the study (resumable), in the
    optimizer's units (``expand``: the optimizer's plans -> the study's), signed so higher is better. ``step`` rows =
    one engine micro-batch."""

    def __init__(self, recorded, expand: Callable[[np.ndarray], np.ndarray], sign: float, rows: int, step: int):
        self.recorded, self.expand, self.sign, self.rows, self.step = recorded, expand, sign, int(rows), int(step)

    def score(self, counts: np.ndarray, rows: int):
        from allocopt.search.fidelity import Score

        rows = min(self.rows, -(-int(rows) // self.step) * self.step)
        return [Score.from_rows(r.row_sums, r.row_tokens, self.sign)
                for r in self.recorded.partial(self.expand(counts), rows)]

    def prune(self, counts: np.ndarray) -> None:
        self.recorded.prune(self.expand(counts))


# Why a search that races by default did not (plan.json "racing" and the CLI line); None when it raced or never would.
RACING_OFF_QUEUE = ("off: --workers > 1 or a server storage hand out whole evaluations, so every plan was scored on "
                    "all rows (run with one process on SQLite to race)")


def racing_note(optimizer, ctx) -> str | None:
    return _racing_note(optimizer.races(ctx.options), ctx.fidelity)


def _racing_note(races: bool, fidelity) -> str | None:
    if not races:
        return None
    if fidelity is None:
        return RACING_OFF_QUEUE
    if fidelity.rows <= fidelity.step:
        return (f"off: the search set is one micro-batch ({fidelity.rows} rows), so there is no smaller fidelity "
                "to race on (raise --num-seqs)")
    return "on"


# ---- resume ----------------------------------------------------------------------------------------

class CallClock:
    """Wall-clock of a study's search over every ``allocopt run`` call that worked on it, a killed one included:
    each call keeps its own elapsed seconds in the study (user attr ``wall_time_by_call``, updated after every
    batch of evaluations), so a resumed run reports the whole search, not only its own part."""

    KEY = "wall_time_by_call"

    def __init__(self, study, start: float):
        self.study, self.start = study, start
        self.call = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} {uuid.uuid4().hex[:8]}"

    def record(self) -> dict[str, float]:
        """Store this call's time so far; returns plan.json's ``wall_time_s`` (all calls) and ``wall_time_call_s``."""
        mine = round(time.perf_counter() - self.start, 3)
        calls = {**self.study.user_attrs.get(self.KEY, {}), self.call: mine}
        self.study.set_user_attr(self.KEY, calls)
        return {"wall_time_s": round(sum(calls.values()), 3), "wall_time_call_s": mine}


def check_resumable(config: RunConfig, attrs: dict[str, Any], directions: list[str] | None,
                    legacy: Callable[[], str] | None = None) -> None:
    """Refuse to reuse a study whose trials were scored on another model, data, criterion, objective, budget or
    space (bit-widths included: a count-only study and a ``--bits`` one are different spaces), or that has another
    number of objectives (``directions``: ga's one against nsga2's two).

    ``legacy`` gives this model's fingerprint in the scheme before ``allocopt.models.identity`` (routers only): a
    study stored with it is refused too (that scheme could not tell apart models that differ only in their experts,
    so a match proves nothing), with a message that says why rather than "another model".

    ``directions`` None is the early check, as soon as the model is loaded and before calibration: only the keys in
    ``attrs`` (the model fingerprint) are compared, so a run on other weights is refused before it observes."""
    import optuna

    from allocopt.search.study import missing_database

    if missing_database(config.storage_url) is not None:    # no study yet (and opening would create its file)
        return
    try:
        study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    except KeyError:
        return
    keys = [k for k in _SAME_FOR_RESUME if directions is not None or k in attrs]
    differ = [k for k in keys if k in study.user_attrs and study.user_attrs[k] != attrs.get(k)]
    if directions is not None and study.user_attrs.get(BITS_ATTR) != attrs.get(BITS_ATTR):   # None: count-only study
        differ.append("--bits")
    if "model_fingerprint" in differ and legacy is not None and study.user_attrs["model_fingerprint"] == legacy():
        raise AllocoptError(f"study {config.name!r} in {config.storage_url} was made with allocopt's earlier model "
                            "fingerprint (router weights only), which cannot tell whether its trials were scored on this "
                            "model; pass a new --name (or --storage) to search again")
    if differ:
        raise AllocoptError(f"study {config.name!r} in {config.storage_url} was searched with another {', '.join(differ)}; "
                            "pass a new --name (or --storage) for this search")
    if directions is not None and len(study.directions) != len(directions):
        raise AllocoptError(f"study {config.name!r} in {config.storage_url} has {len(study.directions)} objective(s) and "
                            f"{config.optimizer} searches {len(directions)} (nsga2 adds memory to the objective); pass a "
                            "new --name (or --storage) for this search")


# The study attribute listing a --bits search's bit-width options (0: the checkpoint's precision).
BITS_ATTR = "bits"

# Everything a stored trial's value depends on besides its allocation.
_SAME_FOR_RESUME = ("model_fingerprint", "calibration_fingerprint", "search_fingerprint", "criterion", "objective",
                    "tolerance", "layers", "budget", "count_multiple", "allowed_counts")


# ---- reporting -------------------------------------------------------------------------------------

def _bound(values: dict[tuple[int, ...], Any], recorder, best: np.ndarray) -> list[float] | None:
    """[lo, hi] certified around the best plan's value: from this call, else from its stored trial."""
    from allocopt.search.study import ALLOCATION, BOUND

    key = tuple(int(c) for c in best)
    if key in values:
        return [float(values[key].lo), float(values[key].hi)]
    for trial in recorder.study.get_trials(deepcopy=False):
        if tuple(trial.user_attrs.get(ALLOCATION, ())) == key and BOUND in trial.user_attrs:
            return [float(b) for b in trial.user_attrs[BOUND]]
    return None


class _progress_bar:
    """A tqdm bar over evaluations showing the best value so far; a no-op callback when disabled."""

    def __init__(self, total: int, sign: float, enabled: bool):
        self.total, self.sign, self.enabled, self.bar = total, sign, enabled, None

    def __enter__(self) -> Callable[[float, float], None] | None:
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="search", unit="eval")

        def update(evaluations: float, best: float) -> None:
            self.bar.update(max(0, min(int(evaluations), self.total) - self.bar.n))
            self.bar.set_postfix(best=f"{self.sign * best:.5f}", refresh=False)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
