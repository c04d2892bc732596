"""`allocopt run` as a library call: problem -> statistics -> ranking -> objective -> optimizer -> plan.json.

Work that costs nothing comes first (config and budget checks), so an impossible request fails before any
weights load. Expensive results are reused: routing statistics are cached in the run directory (and found in
sibling run directories with the same model and calibration data), and every evaluated plan is an Optuna
trial, so re-running the same command evaluates nothing twice.

    result = run_search(RunConfig.from_sources("problems/testbed-50.toml"))
    result.summary["esap"], result.summary["uniform_esap"], result.plan_path
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_json, output_dir
from allocopt.plan import PLAN_FILE, Plan

STATS_FILE = "calibration.safetensors"
FRONT_FILE = "front.json"


@dataclass
class RunResult:
    config: RunConfig
    summary: dict[str, Any]          # plan.json's top-level fields (everything but "layers")
    plan_path: Path
    front_path: Path | None          # nsga2 only
    new_evaluations: int             # plans evaluated by this call (0 when the study already had them all)
    calibration_reused: bool
    trace: list[dict[str, float]]    # after each batch the optimizer evaluated: budget spent, engine layer-tokens,
                                     # seconds since the evaluator was ready, best value (benchmarks/search_efficiency.py)


def run_search(config: RunConfig, progress: bool = True) -> RunResult:
    """Search the allocation described by ``config`` and write ``plan.json`` (and ``front.json``) to its run dir."""
    from allocopt.search.study import check_storage

    start = time.perf_counter()
    space = peek_space(config)
    check_options(config, space)
    config.check_context()                              # rows must fit the model's context (config only)
    with output_dir(config.run_dir) as run_dir:          # the default study database lives beside the run dir
        check_storage(config.storage_url)
        return _search(config, run_dir, progress, start)


def _search(config: RunConfig, run_dir: Path, progress: bool, start: float) -> RunResult:
    from allocopt.criteria import get_criterion, rank
    from allocopt.data import load_tokens
    from allocopt.models import describe, load_model
    from allocopt.objectives import Evaluator
    from allocopt.search.optimizers import SearchContext, get_optimizer
    from allocopt.search.workers import recorder_for, uses_queue, workers_for

    model, tokenizer = load_model(config.model, config.load_options())
    if tokenizer is None:
        raise AllocoptError(f"model {config.model} has no tokenizer files; add tokenizer.json to the checkpoint directory")
    info = describe(model)
    space = space_for(config, info)
    search_space = space.lattice()        # in units of group-count experts where routing is group-limited

    stats, reused = calibration_stats(model, tokenizer, info.fingerprint, config, progress)
    criterion = get_criterion(config.criterion)
    ranking = rank(stats, criterion, groups={l.index: l.groups for l in info.layers})
    scores = criterion(stats)

    tokens = load_tokens(config.search_data, tokenizer, config.search_seq_len, config.search_num_seqs, split="search")
    evaluator = Evaluator(model, tokens, objective=config.objective, tolerance=config.tolerance)
    ready = time.perf_counter()
    counter = {"plans": 0, "partial": 0}
    values: dict[tuple[int, ...], Any] = {}

    def evaluate_plans(counts: np.ndarray, rows: int | None = None) -> list[Any]:
        """counts [n, L] -> objective values on the first ``rows`` search rows (None: all, the full value); kept ids
        of layer l are the first counts[l] of its ranking."""
        kept = [{l: ranking[l][: int(c)] for l, c in zip(space.layers, row)} for row in np.asarray(counts)]
        out = evaluator.evaluate(kept, rows=rows)
        if rows is None:
            counter["plans"] += len(kept)
            values.update({tuple(int(c) for c in row): v for row, v in zip(np.asarray(counts), out)})
        else:
            counter["partial"] += len(kept)
        return out

    attrs = {"model": config.model, "model_fingerprint": info.fingerprint, "calibration_fingerprint": stats.data_fingerprint,
             "search_fingerprint": tokens.fingerprint(), "criterion": config.criterion, "objective": config.objective,
             "tolerance": config.tolerance, "seed": config.seed, "budget": int(space.budget), "layers": list(space.layers)}
    check_resumable(config, attrs)
    optimizer = get_optimizer(config.optimizer)
    directions, metrics = [evaluator.direction], [config.objective]
    if getattr(optimizer, "memory_objective", False):   # the dashboard's Pareto view: objective vs expert memory
        directions, metrics = directions + ["minimize"], metrics + ["memory_bytes"]
    recorder = recorder_for(config, directions, attrs, metrics, space=space, ranking=ranking)
    recorded = recorder.wrap(evaluate_plans, optimizer=config.optimizer)
    sign = 1.0 if evaluator.direction == "maximize" else -1.0     # optimizers maximise; the study keeps true values

    def evaluate(units: np.ndarray) -> np.ndarray:
        """Optimizers search ``search_space`` (counts in units); the study and the plans are in experts."""
        return sign * recorded(space.expand(units))

    # Racing scores plans on the first rows of the search set; the queue of a multi-process search (workers.py)
    # hands out whole evaluations only, so there every plan is scored on all rows.
    fidelity = None if uses_queue(config) else StudyFidelity(recorded, space, sign, evaluator.num_rows,
                                                               evaluator.rows_for(1))
    uniform = search_space.uniform()
    uniform_value = float(evaluate(uniform[None, :])[0])
    trace = [{"equivalents": 0.0, "layer_tokens": evaluator.counters["layer_tokens"],
              "seconds": time.perf_counter() - ready, "best": sign * uniform_value}]
    with workers_for(config, recorder), _progress_bar(config.max_evals, sign, progress) as on_generation:
        def traced(spent: float, best: float) -> None:
            trace.append({"equivalents": float(spent), "layer_tokens": evaluator.counters["layer_tokens"],
                          "seconds": time.perf_counter() - ready, "best": sign * best})
            if on_generation is not None:
                on_generation(spent, best)

        ctx = SearchContext(space=search_space, evaluate=evaluate, seed=config.seed, max_evals=config.max_evals,
                            population=config.population, ranking=ranking, scores=scores, stats=stats,
                            on_generation=traced, options=dict(config.options), expert_space=space,
                            fidelity=fidelity)
        result = optimizer.run(ctx)

    # A search also saw the uniform plan, so it never hands back something worse than that baseline; a fixed
    # allocation (uniform, global, grape) is reported as it is, even where uniform scores higher.
    best, best_value = space.expand(result.best), float(result.best_value)
    uniform = space.expand(uniform)
    if not getattr(optimizer, "fixed_allocation", False) and not best_value >= uniform_value:
        best, best_value = uniform, uniform_value
    counts = {l: int(c) for l, c in zip(space.layers, best)}
    total = int(space.num_experts.sum())
    summary = {
        "esap": sign * best_value,
        "uniform_esap": sign * uniform_value,
        "evaluations": int(result.evaluations),
        "evaluation_equivalents": round(float(result.spent), 4),
        "pruned": int(result.pruned),
        "racing": racing_note(optimizer, ctx),
        "optimizer": config.optimizer,
        "criterion": config.criterion,
        "objective": config.objective,
        "bound": _bound(values, recorder, best),
        "seed": config.seed,
        "model": config.model,
        "sparsity": 1.0 - int(best.sum()) / total,
        "counts": [int(c) for c in best],
        "run_name": config.name,
        "storage": config.storage_url,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    plan = Plan.from_counts(info.fingerprint, ranking, info.num_experts, counts)
    plan.extra.update(summary)
    plan_path = plan.save(run_dir / PLAN_FILE)
    summary = {k: v for k, v in plan.to_json().items() if k != "layers"}
    front_path = None
    if result.front is not None:
        front_path = atomic_write_json(run_dir / FRONT_FILE, {
            "objective": config.objective, "model_fingerprint": info.fingerprint, "layers": list(space.layers),
            "points": [{"counts": [int(c) for c in space.expand(x)], "value": sign * float(v), "memory_bytes": int(m)}
                       for x, v, m in result.front]})
    return RunResult(config, summary, plan_path, front_path, counter["plans"], reused, trace)


# ---- racing -----------------------------------------------------------------------------------------

class StudyFidelity:
    """``SearchContext.fidelity`` of a single-process run: partial scores through the study (resumable), in the
    optimizer's units, signed so higher is better. ``step`` rows = one engine micro-batch."""

    def __init__(self, recorded, space, sign: float, rows: int, step: int):
        self.recorded, self.space, self.sign, self.rows, self.step = recorded, space, sign, int(rows), int(step)

    def score(self, counts: np.ndarray, rows: int):
        from allocopt.search.fidelity import Score

        rows = min(self.rows, -(-int(rows) // self.step) * self.step)
        return [Score.from_rows(r.row_sums, r.row_tokens, self.sign)
                for r in self.recorded.partial(self.space.expand(counts), rows)]

    def prune(self, counts: np.ndarray) -> None:
        self.recorded.prune(self.space.expand(counts))


# Why a search that races by default did not (plan.json "racing" and the CLI line); None when it raced or never would.
RACING_OFF_QUEUE = ("off: --workers > 1 or a server storage hand out whole evaluations, so every plan was scored on "
                    "all rows (run with one process on SQLite to race)")


def racing_note(optimizer, ctx) -> str | None:
    wants = getattr(optimizer, "races", None)
    if wants is None or not wants(ctx.options):
        return None
    if ctx.fidelity is None:
        return RACING_OFF_QUEUE
    if ctx.fidelity.rows <= ctx.fidelity.step:
        return (f"off: the search set is one micro-batch ({ctx.fidelity.rows} rows), so there is no smaller fidelity "
                "to race on (raise --num-seqs)")
    return "on"


# ---- budget ----------------------------------------------------------------------------------------

def space_for(config: RunConfig, info):
    """The allocation space of ``config``'s budget on a model described by ``info`` (a ModelInfo): per-layer
    floors from top-k and the router's needs, and the group-limited routing step."""
    from allocopt.search.space import make_space

    return make_space(info.num_experts, info.top_k, info.bytes_per_expert, sparsity=config.sparsity, keep=config.keep,
                      min_density=config.min_density, max_density=config.max_density, min_kept=info.min_kept,
                      unit=info.unit)


def peek_space(config: RunConfig):
    """Check the budget from the model's config alone (weights on the meta device), before loading anything.

    Pruned exports and remote-code models are checked right after loading instead (returns None).
    """
    import torch

    from allocopt.models import describe
    from allocopt.models.export import LAYER_COUNTS_FIELD
    from allocopt.models.loading import instantiate, load_config, resolve

    path = resolve(config.model)
    if config.trust_remote_code:
        return None
    model_config = load_config(path)
    if getattr(model_config, LAYER_COUNTS_FIELD, None) is not None:
        return None
    with torch.device("meta"):
        skeleton = instantiate(model_config)
    return space_for(config, describe(skeleton, fingerprint=False))


def check_options(config: RunConfig, space) -> None:
    """The optimizer's own check of ``--option`` values and the budget (``check(space, max_evals, options)``,
    optional), before any weights load; ``space`` is in experts (None: known only after loading)."""
    from allocopt.search.optimizers import get_optimizer

    check = getattr(get_optimizer(config.optimizer), "check", None)
    if check is not None:
        check(None if space is None else space.lattice(), config.max_evals, dict(config.options))


def check_resumable(config: RunConfig, attrs: dict[str, Any]) -> None:
    """Refuse to reuse a study whose trials were scored on another model, data, criterion or objective."""
    import optuna

    try:
        study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    except KeyError:
        return
    differ = [k for k in _SAME_FOR_RESUME if k in study.user_attrs and study.user_attrs[k] != attrs[k]]
    if differ:
        raise AllocoptError(f"study {config.name!r} in {config.storage_url} was searched with another {', '.join(differ)}; "
                            "pass a new --name (or --storage) for this search")


# Everything a stored trial's value depends on besides its allocation.
_SAME_FOR_RESUME = ("model_fingerprint", "calibration_fingerprint", "search_fingerprint", "criterion", "objective",
                    "tolerance", "layers")


# ---- calibration -----------------------------------------------------------------------------------

def calibration_stats(model, tokenizer, model_fp: str, config: RunConfig, progress: bool):
    """Routing statistics for (model, calibration data): from a cache when the fingerprints match, else observed.

    Returns ``(stats, reused)``. The cache is this run's ``calibration.safetensors`` or a sibling run's, so
    trying another criterion or budget on the same model and data never observes again.
    """
    from allocopt.calibration import RoutingStats, observe
    from allocopt.data import load_tokens

    tokens = load_tokens(config.calib_data, tokenizer, config.calib_seq_len, config.calib_num_seqs, split="calibration")
    data_fp = tokens.fingerprint()
    target = config.run_dir / STATS_FILE
    for candidate in [target, *sorted(config.run_dir.parent.glob(f"*/{STATS_FILE}"))]:
        if _stats_fingerprints(candidate) == (model_fp, data_fp):
            stats = RoutingStats.load(candidate)
            if candidate != target:
                stats.save(target)
            return stats, True
    stats = observe(model, tokens, batch_size=config.calib_batch_size, progress=progress)
    stats.save(target)
    return stats, False


def _stats_fingerprints(path: Path) -> tuple[str, str] | None:
    """(model, data) fingerprints from a statistics file's header, without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("allocopt", "{}"))
    except (SafetensorError, OSError, ValueError):
        return None
    return meta.get("model_fingerprint"), meta.get("data_fingerprint")


# ---- reporting -------------------------------------------------------------------------------------

def _bound(values: dict[tuple[int, ...], Any], recorder, best: np.ndarray) -> list[float] | None:
    """[lo, hi] certified around the best plan's value: from this call, else from its stored trial."""
    key = tuple(int(c) for c in best)
    if key in values:
        return [float(values[key].lo), float(values[key].hi)]
    for trial in recorder.study.get_trials(deepcopy=False):
        if tuple(trial.user_attrs.get("allocation", ())) == key and "bound" in trial.user_attrs:
            return [float(b) for b in trial.user_attrs["bound"]]
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
