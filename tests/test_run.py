"""`allocopt run` end to end on a tiny saved OLMoE with its own tokenizer and a .txt data file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from allocopt.calibration import RoutingStats
from allocopt.cli.main import cli
from allocopt.config import RunConfig
from allocopt.criteria import rank
from allocopt.data import load_tokens
from allocopt.models import describe
from allocopt.runtime import load_model
from allocopt.objectives import Evaluator
from allocopt.plan import Plan
from allocopt.pipeline import run_search
from reliability_kit import make_root

SMALL = ["--seq-len", "32", "--num-seqs", "6", "--calib-num-seqs", "8", "--evals", "12", "--population", "4",
         "--sparsity", "0.5", "--criterion", "reap", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("run"))


def _args(root, *extra: str, name: str = "r1") -> list[str]:
    return ["run", "--model", str(root / "model"), "--data", str(root / "data.txt"), *SMALL,
            "--out", str(root / "runs" / name), "--name", name, *extra]


def _trials(root, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'runs' / name}.db")
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


@pytest.fixture(scope="module")
def first(root):
    result = CliRunner().invoke(cli, _args(root, "--optimizer", "ga", "--json"))
    assert result.exit_code == 0, result.output
    return result


def test_run_writes_a_plan_that_validates_and_matches_the_ranking(root, first):
    plan_path = root / "runs" / "r1" / "plan.json"
    model, tokenizer = load_model(str(root / "model"))
    info = describe(model)
    plan = Plan.load(plan_path).validate_for(info)
    assert sum(plan.counts) == sum(info.num_experts.values()) // 2
    ranking = rank(RoutingStats.load(root / "runs" / "r1" / "calibration.safetensors"), "reap")
    for layer, kept in plan.kept.items():
        assert kept == tuple(sorted(ranking[layer][: len(kept)]))

    # The reported values are what an independent evaluator says about the written plan and the uniform one.
    tokens = load_tokens(str(root / "data.txt"), tokenizer, 32, 6, split="search")
    evaluator = Evaluator(model, tokens, objective="esap")
    uniform = {l: ranking[l][: e // 2] for l, e in info.num_experts.items()}
    best_v, uniform_v = evaluator.evaluate([dict(plan.kept), uniform])
    top = json.loads(plan_path.read_text())
    assert top["esap"] == pytest.approx(best_v.value, abs=1e-6)
    assert top["uniform_esap"] == pytest.approx(uniform_v.value, abs=1e-6)
    assert top["esap"] >= top["uniform_esap"]
    assert top["counts"] == list(plan.counts) and top["optimizer"] == "ga" and top["criterion"] == "reap"
    assert top["model"] == str(root / "model") and top["seed"] == 42 and top["sparsity"] == pytest.approx(0.5)
    lo, hi = top["bound"]
    assert lo <= top["esap"] <= hi


def test_every_evaluation_is_a_trial_and_the_plan_is_the_best_one(root, first):
    top = json.loads((root / "runs" / "r1" / "plan.json").read_text())
    trials = _trials(root, "r1")
    allocations = [tuple(t.user_attrs["allocation"]) for t in trials]
    assert len(set(allocations)) == len(allocations)                 # each plan evaluated once
    assert len(trials) >= top["evaluations"] >= 1
    on_budget = [a for a in allocations if sum(a) == sum(top["counts"])]
    for probe in set(allocations) - set(on_budget):                  # the DP warm start's sensitivity probes:
        assert any(sum(x != y for x, y in zip(probe, a)) == 1 for a in on_budget)   # one layer of a plan moved
    assert max(t.value for t in trials if tuple(t.user_attrs["allocation"]) in on_budget) == pytest.approx(top["esap"])
    assert tuple(top["counts"]) in allocations


def test_json_summary_is_the_last_line(root, first):
    summary = json.loads(first.output.strip().splitlines()[-1])
    top = json.loads((root / "runs" / "r1" / "plan.json").read_text())
    assert summary == {k: v for k, v in top.items() if k != "layers"}
    assert "uniform" in first.output and "best" in first.output


def test_rerun_reuses_statistics_and_trials(root, first):
    stats_file = root / "runs" / "r1" / "calibration.safetensors"
    before_mtime, before = stats_file.stat().st_mtime_ns, len(_trials(root, "r1"))
    again = CliRunner().invoke(cli, _args(root, "--optimizer", "ga", "--json"))
    assert again.exit_code == 0, again.output
    assert stats_file.stat().st_mtime_ns == before_mtime           # not observed again
    assert len(_trials(root, "r1")) == before                       # no new evaluation
    first_counts = json.loads(first.output.strip().splitlines()[-1])["counts"]
    assert json.loads(again.output.strip().splitlines()[-1])["counts"] == first_counts


def test_another_criterion_reuses_a_sibling_runs_statistics(root, first):
    cfg = RunConfig.from_sources(None, {"model": str(root / "model"), "data": str(root / "data.txt"), "seq_len": 32,
                                        "search_num_seqs": 6, "calib_num_seqs": 8, "evals": 6, "population": 3,
                                        "criterion": "frequency", "optimizer": "random", "out": str(root / "runs" / "r2")})
    result = run_search(cfg, progress=False)
    assert result.calibration_reused and result.new_evaluations >= 1
    assert result.summary["criterion"] == "frequency" and result.summary["esap"] >= result.summary["uniform_esap"]


def test_impossible_budget_fails_before_any_weights_load(root, tmp_path):
    bare = tmp_path / "bare"                       # config and tokenizer, but no weights to load
    shutil.copytree(root / "model", bare)
    (bare / "model.safetensors").unlink()
    args = ["run", "--model", str(bare), "--data", str(root / "data.txt"), "--keep", "1", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: keeping 1 of 24 experts is impossible") and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_sparsity_and_keep_are_mutually_exclusive(root):
    result = CliRunner().invoke(cli, ["run", "--sparsity", "0.5", "--keep", "3"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: both sparsity and keep are set (sparsity 0.5, keep 3); give only one of them"]


def test_nsga2_writes_a_front(root):
    result = CliRunner().invoke(cli, _args(root, "--optimizer", "nsga2", name="r3"))
    assert result.exit_code == 0, result.output
    front = json.loads((root / "runs" / "r3" / "front.json").read_text())
    trials = _trials(root, "r3")
    values = {tuple(t.user_attrs["allocation"]): t.values for t in trials}
    assert front["points"]
    for p in front["points"]:                      # the study is two-objective: (esap, memory bytes) per trial
        esap, memory = values[tuple(p["counts"])]
        assert np.isclose(esap, p["value"]) and memory == p["memory_bytes"]
    assert len({m for _, m in values.values()}) > 1, "nsga2 should explore several memory budgets"


@pytest.mark.parametrize("optimizer", ["global", "grape"])
def test_fixed_allocations_are_reported_as_they_are(root, optimizer):
    """global/grape are baselines, not searches: plan.json holds their allocation even where uniform scores higher."""
    result = CliRunner().invoke(cli, _args(root, "--optimizer", optimizer, name=f"fixed-{optimizer}"))
    assert result.exit_code == 0, result.output
    plan = json.loads((root / "runs" / f"fixed-{optimizer}" / "plan.json").read_text())
    uniform, *own = sorted(_trials(root, f"fixed-{optimizer}"), key=lambda t: t.number)   # uniform is scored first
    own = own or [uniform]                                  # the baseline may itself be uniform
    assert len(own) == 1 and plan["evaluations"] == 1
    assert plan["counts"] == own[0].user_attrs["allocation"] and plan["esap"] == pytest.approx(own[0].values[0])
    assert plan["uniform_esap"] == pytest.approx(uniform.values[0])
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert optimizer in lines and "best" not in lines          # named as the baseline it is, not as a search result


def test_effective_sparsity_is_recorded_and_printed_when_it_differs_from_the_request(root):
    """0.3 of 24 experts is 7.2, so 7 are removed: plan.json and the output say 7/24 = 0.2917, not 0.3."""
    args = [a for a in _args(root, "--optimizer", "uniform", name="s30") if a != "0.5"]
    args[args.index("--sparsity") + 1:args.index("--sparsity") + 1] = ["0.3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    top = json.loads((root / "runs" / "s30" / "plan.json").read_text())
    assert sum(top["counts"]) == 17 and top["sparsity"] == pytest.approx(7 / 24)
    assert "sparsity 0.2917  (requested 0.3; 7 of 24 routed experts removed)" in result.output.splitlines()
    plain = CliRunner().invoke(cli, _args(root, "--optimizer", "uniform", name="s50"))
    assert plain.exit_code == 0 and "sparsity" not in plain.output           # 0.5 of 24 is exact: nothing to say


def test_ga_races_by_default_and_records_the_race(root):
    """16 search rows = 4 micro-batches: offspring are scored on 4 rows, the best promoted to 8, survivors to all 16.
    Eliminated plans are PRUNED trials with their partial values by row count; survivors COMPLETE with their full
    value (what an independent evaluator says); the budget counts rows."""
    args = ["run", "--model", str(root / "model"), "--data", str(root / "data.txt"), "--seq-len", "32", "--num-seqs",
            "16", "--calib-num-seqs", "8", "--evals", "30", "--sparsity", "0.5", "--quiet", "--out",
            str(root / "runs" / "race"), "--name", "race", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    top = json.loads(result.output.strip().splitlines()[-1])
    assert top["racing"] == "on" and top["pruned"] > 0 and top["evaluation_equivalents"] <= 30 + 1e-9
    study = optuna.load_study(study_name="race", storage=f"sqlite:///{root / 'runs'}/race.db")
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) == top["pruned"] and len(complete) == top["evaluations"]
    for t in pruned:
        steps = sorted(t.intermediate_values)
        assert steps and set(steps) <= {4, 8} and t.value == t.intermediate_values[steps[-1]]
        assert len(t.user_attrs["row_sums"]) == steps[-1] and t.user_attrs["layer_tokens"] > 0
    raced = [t for t in complete if t.intermediate_values]
    assert raced and all(len(t.user_attrs["row_sums"]) == 16 for t in complete)
    spent = len(complete) + sum(len(t.user_attrs["row_sums"]) / 16 for t in pruned)
    assert top["evaluation_equivalents"] == pytest.approx(spent)

    model, tokenizer = load_model(str(root / "model"))
    evaluator = Evaluator(model, load_tokens(str(root / "data.txt"), tokenizer, 32, 16, split="search"))
    check = raced[:3] + pruned[:3]
    values = evaluator.evaluate([{int(l): ids for l, ids in t.user_attrs["kept"].items()} for t in check])
    for t, v in zip(check, values):
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.value == pytest.approx(v.value, abs=1e-9)             # a survivor's value is its full value
        else:                                                              # a pruned plan's partial is its first rows
            rows = max(t.intermediate_values)
            assert t.value == pytest.approx(sum(v.row_sums[:rows]) / sum(v.row_tokens[:rows]), abs=1e-9)

    again = CliRunner().invoke(cli, args)                                  # resume: every race replays from the study
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["counts"] == top["counts"]
    assert len(study.get_trials()) == len(trials)


def test_dp_returns_the_additive_models_optimum_from_its_probes(root):
    """`--optimizer dp --option dp_rounds=1`: every layer probed within 2 of its uniform count and at its bounds, with
    the rest at uniform (trials off the budget), and further out only where a DP plan sat at the edge of what was
    probed; the last DP plan is the brute-force optimum of the additive -log ESAP model (linear between probed
    counts) built from those trials, and the reported plan the best plan evaluated. With its default rounds, dp
    re-linearises around that plan and ends no worse."""
    import itertools
    import math

    args = ["run", "--model", str(root / "model"), "--data", str(root / "data.txt"), "--seq-len", "32", "--num-seqs",
            "6", "--calib-num-seqs", "8", "--sparsity", "0.5", "--quiet", "--optimizer", "dp", "--out",
            str(root / "runs" / "dp"), "--name", "dp", "--json"]
    result = CliRunner().invoke(cli, args + ["--option", "dp_rounds=1"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output.strip().splitlines()[-1])
    model, _ = load_model(str(root / "model"))
    info = describe(model)
    lower = [max(info.top_k[l], 1) for l in sorted(info.num_experts)]
    upper = [info.num_experts[l] for l in sorted(info.num_experts)]
    trials = sorted(_trials(root, "dp"), key=lambda t: t.number)
    value = {tuple(t.user_attrs["allocation"]): t.value for t in trials}
    uniform = tuple(e // 2 for e in upper)
    budget = sum(uniform)
    probed = [sorted(p[l] for p in value if sum(p) != budget and p[l] != uniform[l]) for l in range(3)]
    assert all(sum(a != b for a, b in zip(p, uniform)) == 1 for p in value if sum(p) != budget)
    for l in range(3):                                                     # round 1: near uniform, then the bounds
        near = {c for d in (1, 2) for c in (uniform[l] - d, uniform[l] + d) if lower[l] <= c <= upper[l]}
        assert near | {lower[l], upper[l]} - {uniform[l]} <= set(probed[l])

    def point(l, c):
        x = list(uniform)
        x[l] = c
        return -math.log(value[tuple(x)]) + math.log(value[uniform])

    def loss(l, c):                                                        # linear between probed counts
        xs = sorted(probed[l] + [uniform[l]])
        return float(np.interp(c, xs, [point(l, x) for x in xs]))

    ranges = [range(min(probed[l] + [uniform[l]]), max(probed[l] + [uniform[l]]) + 1) for l in range(3)]
    plans = [p for p in itertools.product(*ranges) if sum(p) == budget]
    best = min(plans, key=lambda p: sum(loss(l, c) for l, c in enumerate(p)))
    on_budget = [tuple(t.user_attrs["allocation"]) for t in trials if sum(t.user_attrs["allocation"]) == budget]
    assert on_budget[-1] == best                                           # the last DP plan, evaluated last
    assert top["evaluations"] == len(value) and top["esap"] == pytest.approx(max(value[p] for p in on_budget))
    assert value[tuple(top["counts"])] == max(value[p] for p in on_budget)

    args[args.index("--name") + 1] = "dp-rounds"
    args[args.index(str(root / "runs" / "dp"))] = str(root / "runs" / "dp-rounds")
    rounds = CliRunner().invoke(cli, args)
    assert rounds.exit_code == 0, rounds.output
    again = json.loads(rounds.output.strip().splitlines()[-1])
    assert again["esap"] >= top["esap"] and again["evaluations"] >= top["evaluations"]


def test_probes_off_the_budget_are_infeasible_trials_so_the_studys_best_is_the_plan(root, tmp_path):
    """The DP's probes keep more (or fewer) experts than the budget; one scoring above every plan on the budget was
    the study's (and optuna-dashboard's) best trial while plan.json held another. They are Optuna-constrained
    trials now: `study.best_trial` is plan.json's plan, and convergence.csv says what each probe is."""
    import csv

    import optuna

    trials = _trials(root, "dp")
    plan = json.loads((root / "runs" / "dp" / "plan.json").read_text())
    budget = sum(plan["counts"])
    probes = [t for t in trials if sum(t.user_attrs["allocation"]) != budget]
    assert probes and max(t.value for t in probes) > plan["value"]                # a probe scores above the plan
    assert all(max(t.system_attrs["constraints"]) > 0 for t in probes)
    assert all(t.system_attrs["constraints"] == [0.0, 0.0] for t in trials if t not in probes)
    study = optuna.load_study(study_name="dp", storage=f"sqlite:///{root / 'runs' / 'dp'}.db")
    assert study.best_trial.user_attrs["allocation"] == plan["counts"] and study.best_value == plan["value"]
    out = CliRunner().invoke(cli, ["plot", "convergence", str(root / "runs" / "dp"), "--out", str(tmp_path / "plot")])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader((tmp_path / "plot" / "convergence.csv").open()))
    marked = [r for r in rows if r["off_budget"]]
    assert len(marked) == len(probes) and all(r["esap"] == "nan" and "probe" in r["off_budget"] for r in marked)


def test_plan_json_records_the_objective_it_optimised_by_name(root):
    """A KL run's value is stored as what it is (objective kl_pq, value, kl_pq), never as "esap"; plans written
    before the objective's name was recorded (every objective's value under "esap") still read back."""
    result = CliRunner().invoke(cli, _args(root, "--optimizer", "random", "--objective", "kl_pq", "--evals", "4",
                                           name="kl"))
    assert result.exit_code == 0, result.output
    plan = json.loads((root / "runs" / "kl" / "plan.json").read_text())
    assert plan["objective"] == "kl_pq" and "esap" not in plan and "uniform_esap" not in plan
    assert plan["value"] == plan["kl_pq"] and plan["uniform_value"] == plan["uniform_kl_pq"]
    assert 0.0 <= plan["value"] <= plan["uniform_value"]                    # KL is minimised: never above uniform
    assert Plan.load(root / "runs" / "kl" / "plan.json").objective_value() == ("kl_pq", plan["value"], plan["uniform_value"])
    assert "uniform  kl_pq" in result.output
    old = {**{k: v for k, v in plan.items() if k not in ("value", "uniform_value", "kl_pq", "uniform_kl_pq")},
           "esap": 0.25, "uniform_esap": 0.5}
    assert Plan.from_json(old).objective_value() == ("kl_pq", 0.25, 0.5)
    esap_run = json.loads((root / "runs" / "r1" / "plan.json").read_text())
    assert esap_run["objective"] == "esap" and esap_run["value"] == esap_run["esap"]


def test_a_second_run_on_the_same_run_directory_is_refused_naming_the_first(root, tmp_path):
    """Two `allocopt run` on one --out at once raced on the study's schema (raw SQLAlchemy tracebacks) or silently
    overwrote each other's plan.json; the second now stops in one line that names the first, which is untouched."""
    import subprocess
    import sys
    import time

    from allocopt.io import LOCK_FILE
    from reliability_kit import ENV

    out = root / "runs" / "held"
    first = subprocess.Popen([sys.executable, "-m", "allocopt.cli.main", *_args(root, "--optimizer", "ga", "--evals", "40",
                                                                             name="held")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = CliRunner().invoke(cli, _args(root, "--optimizer", "random", "--criterion", "frequency", name="held"))
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    lines = second.output.strip().splitlines()
    assert second.exit_code == 2 and len(lines) == 1 and f"pid {first.pid} on " in lines[0], second.output
    assert lines[0].startswith(f"error: run directory {out} is in use by") and "pass another --out" in lines[0]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["optimizer"] == "ga" and plan["criterion"] == "reap"            # the first run's result, intact
    assert not (out / LOCK_FILE).exists()                                        # released when the run ended


def test_a_second_run_on_the_same_study_from_another_run_directory_is_refused(root):
    """Another --out with the same --name searches the same study (the default database lives beside the run dirs):
    held for the first run too, so the two cannot write one study at once."""
    import subprocess
    import sys
    import time

    from reliability_kit import ENV

    db = root / "runs" / "shared.db"
    first = subprocess.Popen([sys.executable, "-m", "allocopt.cli.main", *_args(root, "--optimizer", "ga", "--evals", "40",
                                                                             name="shared")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lock = db.with_name("shared.db.shared.lock")
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    args = _args(root, "--optimizer", "random", name="shared")
    args[args.index("--out") + 1] = str(root / "runs" / "shared-elsewhere" / "x")     # not the first one's run dir
    second = CliRunner().invoke(cli, args + ["--storage", f"sqlite:///{db}"])
    first.communicate(timeout=600)
    assert first.returncode == 0
    lines = second.output.strip().splitlines()
    assert second.exit_code == 2 and len(lines) == 1, second.output
    assert lines[0].startswith(f"error: study shared in {db.resolve()} is in use by pid {first.pid}")
    assert "pass another --name" in lines[0] and not lock.exists()
