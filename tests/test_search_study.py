"""StudyRecorder on real SQLite storage: trials with the allocation, FAIL trials, resume without re-evaluating."""
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from allocopt.search.optimizers import SearchContext, available_optimizers, get_optimizer
from allocopt.search.space import make_space
from allocopt.search.study import StudyRecorder
from allocopt.testing.toy import toy_objective


@dataclass
class Value:
    """ObjectiveValue-like: value plus a certified [lo, hi] bound."""
    value: float
    lo: float
    hi: float


@pytest.fixture()
def space():
    return make_space({l: 12 for l in (0, 2, 3, 5)}, {l: 2 for l in (0, 2, 3, 5)}, {l: 64 * (l + 1) for l in (0, 2, 3, 5)},
                      sparsity=0.5)


def recorder_and_counter(space, url, name="s", directions=("maximize",)):
    f = toy_objective(space, seed=2)
    ranking = {l: list(range(12))[::-1] for l in space.layers}
    calls = []

    def evaluate_plans(X):
        calls.append(len(X))
        return [Value(float(v), float(v) - 1e-4, float(v) + 1e-4) for v in f(X)]

    rec = StudyRecorder(url, name, list(directions), {"criterion": "reap", "objective": "esap", "seed": 0,
                                                       "layers": list(space.layers)},
                        ["esap", "memory_bytes"][: len(directions)], space=space, ranking=ranking)
    return rec, evaluate_plans, calls, ranking


def run(space, evaluate, name, seed=0, max_evals=16):
    stats = SimpleNamespace(similarity={l: np.eye(12) for l in space.layers})   # what grape reads of RoutingStats
    ctx = SearchContext(space, evaluate, seed, max_evals, 6, {l: list(range(12)) for l in space.layers},
                        {l: np.arange(12.0) for l in space.layers}, stats)
    return get_optimizer(name).run(ctx)


@pytest.mark.parametrize("name", available_optimizers())
def test_every_optimizer_records_trials_and_resumes_without_evaluating(space, tmp_path, name):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    rec, plans, calls, ranking = recorder_and_counter(space, url)
    first = run(space, rec.wrap(plans, name), name)
    trials = rec.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sum(calls) == len(trials) == first.evaluations
    by_plan = {tuple(t.user_attrs["allocation"]): t for t in trials}
    assert len(by_plan) == len(trials)                               # no plan recorded twice
    if name not in ("nsga2", "global", "grape"):                      # searches start from the uniform plan
        assert tuple(space.uniform()) in by_plan
    for plan, t in by_plan.items():
        assert [t.params[f"layer_{l:03d}"] for l in space.layers] == list(plan)
        assert t.user_attrs["optimizer"] == name and t.user_attrs["criterion"] == "reap"
        assert t.user_attrs["memory_bytes"] == int(space.memory_bytes(plan))
        assert t.user_attrs["kept"] == {str(l): ranking[l][:k] for l, k in zip(space.layers, plan)}
        lo, hi = t.user_attrs["bound"]
        assert lo < t.value < hi
    best_trial = by_plan[tuple(first.best)]
    assert best_trial.value == pytest.approx(first.best_value)

    rec2, plans2, calls2, _ = recorder_and_counter(space, url)       # a fresh process resuming the study
    second = run(space, rec2.wrap(plans2, name), name)
    assert calls2 == [] and len(rec2.study.trials) == len(trials)
    assert second.best.tolist() == first.best.tolist() and second.best_value == first.best_value


def test_failed_plans_become_fail_trials_and_are_retried(space, tmp_path):
    rec, _, _, _ = recorder_and_counter(space, f"sqlite:///{tmp_path / 's.db'}")
    attempts = []

    def flaky(X):
        attempts.append(len(X))
        return [Value(math.nan, math.nan, math.nan) if len(attempts) == 1 else Value(0.5, 0.4, 0.6) for _ in X]

    evaluate = rec.wrap(flaky, "ga")
    assert np.isnan(evaluate(space.uniform()[None])[0])
    failed = rec.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"]
    assert evaluate(space.uniform()[None])[0] == 0.5                # a FAIL is not served from the study
    assert attempts == [1, 1]


def test_an_exception_leaves_no_running_trial(space, tmp_path):
    rec, _, _, _ = recorder_and_counter(space, f"sqlite:///{tmp_path / 's.db'}")

    def crash(X):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        rec.wrap(crash, "ga")(space.uniform()[None])
    assert rec.study.trials == []                  # a trial is written once its plan is decided, never half-way


def test_two_objective_study_gets_memory_and_metric_names(space, tmp_path):
    rec, plans, _, _ = recorder_and_counter(space, f"sqlite:///{tmp_path / 's.db'}", "mo", ("maximize", "minimize"))
    result = run(space, rec.wrap(plans, "nsga2"), "nsga2", max_evals=24)
    assert rec.study.metric_names == ["esap", "memory_bytes"]
    for t in rec.study.trials:
        assert t.values[1] == space.memory_bytes(t.user_attrs["allocation"])
    front = {tuple(x) for x, _, _ in result.front}
    assert front == {tuple(t.user_attrs["allocation"]) for t in rec.study.best_trials}


def test_allocopt_reaches_optuna_through_public_apis():
    """No private field of an Optuna study or trial (``_storage``, ``_study_id``, ``_trial_id``): allocopt holds the
    storage it opens (``StudyRecorder.storage``) and asks it for ids, so an Optuna release cannot break it silently."""
    import re
    from pathlib import Path

    import allocopt

    private = re.compile(r"\._(storage|study_id|trial_id)\b")
    found = [f"{path.name}:{n}: {line.strip()}" for path in sorted(Path(allocopt.__file__).parent.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if private.search(line)]
    assert found == []


def test_recorder_holds_the_storage_its_study_uses(space, tmp_path):
    from allocopt.search.study import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    rec = StudyRecorder(storage, "held", ["maximize"], {"objective": "toy"}, ["toy"], space=space)
    rec.wrap(lambda X: [0.5 for _ in X], "ga")(space.uniform()[None])
    assert rec.storage is storage
    [trial] = storage.get_all_trials(storage.get_study_id_from_name("held"))
    assert trial.user_attrs["allocation"] == space.uniform().tolist() and trial.value == 0.5


def test_plot_sources_read_trials_by_the_recorders_attr_names():
    """allocopt.plotting.sources reads trial user attrs through study.py's constants, never re-spelled literals."""
    import ast
    import inspect

    import allocopt.plotting.sources as sources
    from allocopt.search import study

    names = {value for key, value in vars(study).items() if key.isupper() and isinstance(value, str)}
    keys = []
    for node in ast.walk(ast.parse(inspect.getsource(sources))):
        if isinstance(node, ast.Subscript):
            keys.append(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
            keys.append(node.args[0])
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            keys.append(node.left)
    literals = sorted({k.value for k in keys if isinstance(k, ast.Constant) and k.value in names})
    assert literals == []
