"""Plots from real SQLite Optuna studies and real plan files built in tmp_path.

The studies hold trials with the attrs `allocopt run` records (allocation, layers, optimizer, memory_bytes, ...);
their ESAP values come from a closed-form toy score, so every expected number below (front, hypervolume, running
best, densities) is recomputed here independently of allocopt.plotting.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState, create_trial
from PIL import Image

from allocopt.cli.main import cli
from allocopt.errors import AllocoptError
from allocopt.plan import Plan
from allocopt.plotting import hypervolume, non_dominated, plot_convergence, plot_density, plot_pareto

REPO = Path(__file__).resolve().parents[1]
LAYERS = [1, 2, 3, 5]            # decoder indices of the MoE layers (layer 0 and 4 dense)
E = 8                             # experts per layer
BPE = 1_500_000                   # bytes per expert
SENS = np.array([0.6, 0.2, 0.35, 0.1])   # how much each layer suffers from pruning
FULL = (E,) * len(LAYERS)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def toy_esap(counts) -> float:
    c = np.asarray(counts, float)
    return float(np.prod(1.0 - SENS * (1.0 - c / E) ** 2))


def uniform_counts(budget: int) -> tuple[int, ...]:
    base, rem = divmod(budget, len(LAYERS))
    return tuple(base + (i < rem) for i in range(len(LAYERS)))


def _attrs(counts, optimizer: str, **extra) -> dict:
    return {"allocation": [int(c) for c in counts], "layers": LAYERS, "optimizer": optimizer, "criterion": "reap",
            "memory_bytes": int(sum(counts) * BPE), "bound": [0.0, 0.0], "seed": 0, **extra}


def _add(study, counts, optimizer, multi, **extra):
    v = toy_esap(counts)
    values = [v, float(sum(counts) * BPE)] if multi else [v]
    study.add_trial(create_trial(values=values, user_attrs=_attrs(counts, optimizer, **extra)))


def _write_plan(run_dir: Path, counts, optimizer: str, uniform_esap: float | None, **extra) -> Path:
    ranking = {l: list(range(E)) for l in LAYERS}
    counts = [int(c) for c in counts]
    plan = Plan.from_counts("fp-toy", ranking, {l: E for l in LAYERS}, dict(zip(LAYERS, counts)),
                            esap=toy_esap(counts), uniform_esap=uniform_esap, optimizer=optimizer, criterion="reap",
                            sparsity=1 - sum(counts) / (E * len(LAYERS)), **extra)
    plan.extra["counts"] = counts        # from_counts takes `counts` itself, so this plan.json field goes in after
    run_dir.mkdir(parents=True, exist_ok=True)
    return plan.save(run_dir / "plan.json")


def make_nsga2_run(root: Path, name: str = "mo", n: int = 60, seed: int = 0) -> Path:
    """Random allocations at all budgets, the uniform plan at several budgets (attr uniform), the unpruned
    allocation (the known ESAP optimum), and one failed evaluation."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{root / f'{name}.db'}",
                                directions=["maximize", "minimize"])
    for i in range(n):
        counts = rng.integers(2, E + 1, size=len(LAYERS))
        _add(study, counts, "nsga2", True)
        if i % 15 == 0:
            _add(study, uniform_counts(8 + 4 * (i // 15 % 6)), "nsga2", True, uniform=True)
    _add(study, FULL, "nsga2", True)
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=_attrs((2, 2, 2, 2), "nsga2")))
    run = root / name
    _write_plan(run, (6, 3, 5, 2), "nsga2", toy_esap(uniform_counts(16)))
    return run


def make_single_run(root: Path, name: str, optimizer: str, seed: int, budget: int = 16, n: int = 40) -> Path:
    """A budget-preserving hill climb from the uniform plan (recorded as optimizer "uniform"), with a failure."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{root / f'{name}.db'}", direction="maximize")
    best = np.array(uniform_counts(budget))
    _add(study, best, "uniform", False)
    for i in range(n):
        if i == 5:
            study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=_attrs(best, optimizer)))
            continue
        cand = best.copy()
        a, b = rng.choice(len(LAYERS), 2, replace=False)
        if cand[b] > 2 and cand[a] < E:
            cand[a] += 1
            cand[b] -= 1
        _add(study, cand, optimizer, False)
        if toy_esap(cand) > toy_esap(best):
            best = cand
    run = root / name
    _write_plan(run, best, optimizer, toy_esap(uniform_counts(budget)))
    return run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG" and 800 <= w <= 2000 and 500 <= h <= 1500
        px = np.asarray(im.convert("L"))
        assert px.std() > 5            # not a blank canvas


def sweep_hv(esap: np.ndarray, mem_gb: np.ndarray, ref_gb: float) -> float:
    """Area of {(e, m): some point has memory <= m <= ref and ESAP >= e >= 0}, swept along memory."""
    order = np.argsort(mem_gb)
    edges = np.append(np.minimum(mem_gb[order], ref_gb), ref_gb)
    best = np.maximum.accumulate(np.maximum(esap[order], 0.0))
    return float(np.sum(best * np.clip(np.diff(edges), 0, None)))


def brute_front(esap: np.ndarray, mem: np.ndarray) -> np.ndarray:
    n = len(esap)
    return np.array([not any((esap[j] >= esap[i] and mem[j] <= mem[i]) and (esap[j] > esap[i] or mem[j] < mem[i])
                             for j in range(n)) for i in range(n)])


# ---------------------------------------------------------------------------------------------- pareto
def test_pareto_from_run_dir(tmp_path):
    run = make_nsga2_run(tmp_path)
    paths = plot_pareto([str(run)])
    assert paths["png"] == run / "plots" / "pareto.png"
    check_png(paths["png"])

    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'mo.db'}")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    rows = read_csv(paths["csv"])
    assert [int(r["trial"]) for r in rows] == [t.number for t in done]        # failed trial left out
    esap = np.array([float(r["esap"]) for r in rows])
    mem = np.array([float(r["memory_bytes"]) for r in rows])
    assert np.allclose(esap, [t.values[0] for t in done]) and np.allclose(mem, [t.values[1] for t in done])

    on_front = np.array([r["on_front"] == "1" for r in rows])
    assert np.array_equal(on_front, brute_front(esap, mem))
    full_row = next(r for r in rows if r["counts"] == " ".join(map(str, FULL)))
    assert full_row["on_front"] == "1" and math.isclose(float(full_row["esap"]), 1.0)

    marked = {t.number for t in done if t.user_attrs.get("uniform")}
    uniform_rows = {int(r["trial"]) for r in rows if r["uniform"] == "1"}
    assert marked and marked <= uniform_rows
    for r in rows:      # every row flagged uniform really is the balanced allocation of its budget
        if r["uniform"] == "1":
            c = [int(x) for x in r["counts"].split()]
            assert max(c) - min(c) <= 1

    summary = json.loads(paths["json"].read_text())
    ref_gb = E * len(LAYERS) * BPE / 1e9                                      # unpruned expert memory
    assert summary["reference_point"] == [0.0, pytest.approx(ref_gb)]
    assert summary["hypervolume"] == pytest.approx(sweep_hv(esap, mem / 1e9, ref_gb), rel=1e-9)
    assert summary["front_points"] == int(on_front.sum())


@pytest.mark.parametrize("shape", ["list", "runner"])
def test_pareto_from_front_json(tmp_path, shape):
    """front.json as the brief's list of {counts, esap, memory_bytes}, or as `allocopt run` writes it
    ({"points": [{counts, value, memory_bytes}]}) beside a single-objective study."""
    run = tmp_path / "front-run"
    _write_plan(run, (6, 3, 5, 2), "nsga2", None)
    if shape == "runner":
        make_single_run(tmp_path, "front-run", "nsga2", seed=0, n=3)   # sibling .db, one objective only
    pts = [{"counts": list(c), "esap": toy_esap(c), "memory_bytes": sum(c) * BPE}
           for c in [(2, 2, 2, 2), (4, 2, 3, 2), (8, 3, 6, 2), FULL, (3, 3, 3, 3)]]
    body = pts if shape == "list" else {"objective": "esap", "points": [
        {"counts": p["counts"], "value": p["esap"], "memory_bytes": p["memory_bytes"]} for p in pts]}
    (run / "front.json").write_text(json.dumps(body))
    paths = plot_pareto([str(run / "front.json")], out=tmp_path / "out")
    check_png(paths["png"])
    rows = read_csv(paths["csv"])
    assert [r["counts"] for r in rows] == [" ".join(map(str, p["counts"])) for p in pts]
    assert [r["uniform"] for r in rows] == ["1", "0", "0", "1", "1"]
    esap = np.array([p["esap"] for p in pts])
    mem = np.array([p["memory_bytes"] for p in pts], float)
    assert json.loads(paths["json"].read_text())["source"] == "front.json"
    assert json.loads(paths["json"].read_text())["hypervolume"] == pytest.approx(sweep_hv(esap, mem / 1e9, E * 4 * BPE / 1e9))


def test_front_and_hypervolume_match_brute_force_on_random_clouds():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        esap = np.round(rng.uniform(-0.1, 1.0, n), 2)          # rounding makes ties; negatives lie past the ref
        mem = np.round(rng.uniform(0.0, 1.2, n), 2)
        front = non_dominated(esap, mem)
        assert np.array_equal(front, brute_front(esap, mem))
        assert hypervolume(esap[front], mem[front], 1.0) == pytest.approx(sweep_hv(esap, mem, 1.0), abs=1e-12)


def test_pareto_ref_memory_override_and_storage_flags(tmp_path):
    make_nsga2_run(tmp_path)
    paths = plot_pareto([], out=tmp_path / "o", storage=f"sqlite:///{tmp_path / 'mo.db'}", study_name="mo",
                        ref_memory_gb=1.0)
    assert json.loads(paths["json"].read_text())["reference_point"] == [0.0, 1.0]
    # a bare storage knows nothing about the unpruned model: the fixed reference must be given
    with pytest.raises(AllocoptError, match="--ref-memory-gb"):
        plot_pareto([str(tmp_path / "mo.db")], out=tmp_path / "o2")


# ---------------------------------------------------------------------------------------------- convergence
def test_convergence_two_runs(tmp_path):
    runs = [make_single_run(tmp_path, "ga-run", "ga", seed=1), make_single_run(tmp_path, "cma-run", "cmaes", seed=2)]
    paths = plot_convergence([str(r) for r in runs], out=tmp_path / "out")
    check_png(paths["png"])
    rows = read_csv(paths["csv"])
    assert {r["optimizer"] for r in rows} == {"ga", "cmaes"}                 # the uniform trial is a line, not a curve
    for name, opt in [("ga-run", "ga"), ("cma-run", "cmaes")]:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
        trials = [t for t in study.trials if t.user_attrs["optimizer"] == opt]
        expected, best = [], -math.inf
        for t in trials:
            if t.state == TrialState.COMPLETE:
                best = max(best, t.value)
            expected.append(best)
        mine = [r for r in rows if r["optimizer"] == opt]
        assert [int(r["trial"]) for r in mine] == [t.number for t in trials]
        assert [int(r["evaluation"]) for r in mine] == list(range(1, len(trials) + 1))
        got = np.array([float(r["best_so_far"]) for r in mine])
        assert np.allclose(got, expected) and np.all(np.diff(got) >= 0)
        assert any(r["esap"] == "nan" for r in mine)                          # the failed evaluation is counted
    summary = json.loads(paths["json"].read_text())
    assert summary["uniform_esap"] == {"ga-run": pytest.approx(toy_esap(uniform_counts(16))),
                                       "cma-run": pytest.approx(toy_esap(uniform_counts(16)))}


def test_convergence_from_storage_with_two_studies(tmp_path):
    """One .db holding two studies of the same optimizer: two curves, told apart by study name; the uniform
    level comes from the trials themselves (no plan.json)."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    for name, seed in [("seed-a", 1), ("seed-b", 2)]:
        make_single_run(tmp_path, name, "ga", seed=seed)
        optuna.copy_study(from_study_name=name, from_storage=f"sqlite:///{tmp_path / f'{name}.db'}", to_storage=storage)
    res = CliRunner().invoke(cli, ["plot", "convergence", str(tmp_path / "shared.db"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "convergence.json").read_text())
    assert sorted(c["label"] for c in summary["curves"]) == ["ga (seed-a)", "ga (seed-b)"]
    assert summary["uniform_esap"]["seed-a"] == pytest.approx(toy_esap(uniform_counts(16)))


def test_run_dir_finds_its_study_through_plan_json(tmp_path):
    """`allocopt run` records "storage" and "run_name" in plan.json; the .db may live anywhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_single_run(elsewhere, "r1", "ga", seed=4)
    run = tmp_path / "renamed-dir"
    plan = Plan.load(elsewhere / "r1" / "plan.json")
    plan.extra.update(storage=f"sqlite:///{elsewhere / 'r1.db'}", run_name="r1")
    run.mkdir()
    plan.save(run / "plan.json")
    paths = plot_convergence([str(run)])
    assert paths["png"] == run / "plots" / "convergence.png"
    rows = read_csv(paths["csv"])
    assert {r["study"] for r in rows} == {"renamed-dir"} and len(rows) == 40


# ---------------------------------------------------------------------------------------------- density
def test_density_of_three_plans(tmp_path):
    uni = _write_plan(tmp_path / "uniform", uniform_counts(16), "uniform", None)
    ga = _write_plan(tmp_path / "ga-run", (6, 3, 5, 2), "ga", None)
    grape = _write_plan(tmp_path / "grape-run", (5, 3, 4, 4), "grape", None)
    paths = plot_density([str(uni.parent), str(ga), str(grape)], out=tmp_path / "out")
    check_png(paths["png"])
    rows = read_csv(paths["csv"])
    assert len(rows) == 3 * len(LAYERS)
    for path in (uni, ga, grape):
        plan = json.loads(path.read_text())
        mine = [r for r in rows if r["plan"] == str(path)]
        assert [int(r["layer"]) for r in mine] == LAYERS
        assert [float(r["density"]) for r in mine] == pytest.approx([len(l["kept"]) / E for l in plan["layers"]])
        assert mine[0]["label"] == f"{plan['optimizer']}+reap, ESAP {plan['esap']:.4f}"


def test_density_labels_fall_back_to_file_names(tmp_path):
    bare = Plan.from_counts("fp", {l: list(range(E)) for l in LAYERS}, {l: E for l in LAYERS}, dict(zip(LAYERS, FULL)))
    bare.save(tmp_path / "dense.json")
    _write_plan(tmp_path / "a", (6, 3, 5, 2), "ga", None)
    _write_plan(tmp_path / "b", (4, 4, 4, 4), "ga", None)
    paths = plot_density([str(tmp_path / "dense.json"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert paths["png"] == tmp_path / "plots" / "density.png"                # beside the first plan
    labels = list(dict.fromkeys(r["label"] for r in read_csv(paths["csv"])))
    assert labels[0] == "dense" and labels[1].startswith("ga+reap (a)") and labels[2].startswith("ga+reap (b)")


# ---------------------------------------------------------------------------------------------- CLI and scripts
def test_scripts_write_the_same_outputs(tmp_path):
    run = make_nsga2_run(tmp_path, n=20)
    for kind in ("pareto", "convergence", "density"):
        res = subprocess.run([sys.executable, str(REPO / "plots" / f"{kind}.py"), str(run), "--out", str(tmp_path / kind)],
                             capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        check_png(tmp_path / kind / f"{kind}.png")
        assert f"png: {tmp_path / kind / f'{kind}.png'}" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["pareto", "{tmp}/missing"], "does not exist"),
    (["convergence", "{tmp}/empty.db"], "no finished trials"),
    (["pareto", "{tmp}/ga-run"], "single-objective"),
    (["pareto", "--storage", "sqlite:///{tmp}/ga-run.db", "--study", "nope"], "is not in"),
    (["density", "{tmp}"], "neither a plan file"),
    (["convergence", "{tmp}/garbage.db"], "is corrupt or not an SQLite file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'empty.db'}")
    (tmp_path / "garbage.db").write_bytes(bytes(range(256)) * 64)      # a .db that is not a database
    make_single_run(tmp_path, "ga-run", "ga", seed=0, n=3)
    res = CliRunner().invoke(cli, ["plot", *[a.format(tmp=tmp_path) for a in args]])
    assert res.exit_code == 2
    assert message in res.output and res.output.strip().count("\n") == 0 and res.output.startswith("error: ")


def test_script_bad_input_exit_2(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "plots" / "pareto.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def test_convergence_counts_only_plans_at_the_runs_budget(tmp_path):
    """An nsga2 study spans budgets; its convergence curve must compare only plans of the run's size, so the
    unpruned allocation (ESAP 1.0, off budget) never becomes its best."""
    run = make_nsga2_run(tmp_path)
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'mo.db'}")
    study.set_user_attr("budget", 16)
    at_budget = [t.values[0] for t in study.get_trials(states=(TrialState.COMPLETE,))
                 if sum(t.user_attrs["allocation"]) == 16]
    summary = json.loads(Path(plot_convergence([str(run)], out=tmp_path / "out")["json"]).read_text())
    [curve] = summary["curves"]
    assert curve["evaluations"] == len(study.trials)                 # off-budget plans still count as evaluations
    assert at_budget and curve["best_esap"] == pytest.approx(max(at_budget)) and curve["best_esap"] < 1.0
