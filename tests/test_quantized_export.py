"""A plan with bits (issue 23, items 1, 2 and 5): ``allocopt run --bits`` searches (count, bit-width) per layer under a
byte budget, and ``allocopt prune`` writes a compressed-tensors pack-quantized checkpoint whose tensors weigh what the
budget counted and which loads with the logits the plan was scored with."""
from __future__ import annotations

import csv
import json
import random

import optuna
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from allocopt.cli.main import cli
from allocopt.config import RunConfig
from allocopt.errors import AllocoptError
from allocopt.export import save_pruned
from allocopt.export.size import export_size
from allocopt.models import describe
from allocopt.models.quantization import apply_plan
from allocopt.plan import Plan
from allocopt.runtime import load_model
from allocopt.runtime.loading import LoadOptions
from allocopt.runtime.offload import tensor_bytes
from reliability_kit import save_tiny_model

# per-expert tensors on disk (olmoe, qwen2_moe with a shared expert, mixtral), group-limited routing (deepseek_v3)
FAMILIES = {
    "olmoe": {},
    "qwen2_moe": {},
    "mixtral": {},
    "deepseek_v3": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
}


def _mixed_plan(model, seed: int = 0) -> Plan:
    """Every layer pruned to a random routable count; layers at int4, int8 and the checkpoint's precision in turn."""
    info, rng = describe(model), random.Random(seed)
    counts, ranking, bits = {}, {}, {}
    for i, layer in enumerate(info.layers):
        g = max(1, layer.groups or 1)
        low = max(layer.top_k, layer.min_kept)
        counts[layer.index] = g * rng.randint(-(-low // g), layer.num_experts // g - 1)
        per = layer.num_experts // g             # the same number from every routing group
        ids = [grp * per + j for j in rng.sample(range(per), per) for grp in range(g)]
        ranking[layer.index] = ids
        bits[layer.index] = (4, 8, None)[i % 3]
    return Plan.from_counts(info.fingerprint, ranking, info.num_experts, counts,
                            {l: b for l, b in bits.items() if b is not None})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_export_with_bits_weighs_what_was_counted_and_loads_with_the_scored_logits(family, tmp_path):
    save_tiny_model(tmp_path / "model", family=family, seed=5, **FAMILIES[family])
    model, tokenizer = load_model(str(tmp_path / "model"), LoadOptions(device="cpu"))
    plan = _mixed_plan(model)
    assert sorted(set(plan.bits.values())) == [4, 8] and (len(plan.bits) < len(plan.layers) or len(plan.layers) < 3)
    size = export_size(model, bits=(8, 4))
    counted = size.bytes(dict(zip(plan.kept, plan.counts)), plan.bits)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), apply_plan(model, plan):
        scored = model(ids).logits
    save_pruned(model, tokenizer, tmp_path / "out", plan)
    assert tensor_bytes(tmp_path / "out") == counted
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert len(config["quantization_config"]["config_groups"]) == 2            # one scheme per bit-width
    loaded, _ = load_model(str(tmp_path / "out"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)   # without allocopt
    with torch.no_grad():
        diff = (loaded(ids).logits - scored).abs().max().item()
        plain_diff = (plain(ids).logits - scored).abs().max().item()
    assert diff <= 1e-4 and plain_diff <= 1e-4, (family, diff, plain_diff)


def test_a_checkpoint_that_stores_its_experts_fused_is_refused_with_bits(tmp_path):
    save_tiny_model(tmp_path / "model", family="gpt_oss", seed=5)
    model, _ = load_model(str(tmp_path / "model"), LoadOptions(device="cpu"))
    with pytest.raises(AllocoptError, match="cannot be exported quantized; drop --bits"):
        export_size(model, bits=(4,))


def test_run_with_bits_prune_and_score_the_export_on_the_testbed(tmp_path):
    runner = CliRunner()
    args = ["run", "--bits", "8,4", "--memory-ratio", "0.4", "--evals", "16", "--num-seqs", "4",
            "--out", str(tmp_path / "run"), "--name", "bits", "--json", "--quiet"]
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.bits and summary["export_bytes"] <= summary["memory_budget_bytes"] == int(0.4 * summary["full_export_bytes"])
    assert summary["value"] >= summary["uniform_value"]
    assert [b for b in summary["bits"]] == [lp.bits for lp in plan.layers]
    storage = f"sqlite:///{tmp_path / 'bits.db'}"
    trials = optuna.load_study(study_name="bits", storage=storage).trials
    assert trials and all(any(k.startswith("bits_") for k in t.params) for t in trials)
    again = runner.invoke(cli, args)                                      # the study answers every plan
    resumed = json.loads(again.output.strip().splitlines()[-1])
    assert again.exit_code == 0 and resumed["new_evaluations"] == 0 and resumed["from_study"] == resumed["evaluations"]
    out = tmp_path / "export"
    done = runner.invoke(cli, ["prune", "--plan", str(tmp_path / "run" / "plan.json"), "--out", str(out), "--quiet"])
    assert done.exit_code == 0, done.output
    assert tensor_bytes(out) == summary["export_bytes"]
    described = runner.invoke(cli, ["info", "--model", str(out), "--json"])      # sizes as stored, not as loaded
    assert described.exit_code == 0, described.output
    stored = json.loads(described.output.strip().splitlines()[-1])
    assert stored["stored_bytes"] == summary["export_bytes"] < stored["total_bytes"]
    assert stored["stored_format"] == "compressed-tensors pack-quantized" and "stored: " in described.output
    assert "stored" not in json.loads(runner.invoke(cli, ["info", "--json"]).output.strip().splitlines()[-1])
    scored = runner.invoke(cli, ["esap", "--pruned", str(out), "--num-seqs", "4", "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output.strip().splitlines()[-1])["esap"] == pytest.approx(summary["esap"], abs=1e-5)
    # The packed export is scored and served, never searched or pruned again (full-precision bytes, re-quantizing).
    for again in (["run", "--model", str(out), "--memory-ratio", "0.9", "--out", str(tmp_path / "again")],
                  ["prune", "--plan", str(tmp_path / "run" / "plan.json"), "--model", str(out), "--out", str(tmp_path / "p2")]):
        refused = runner.invoke(cli, again)
        assert refused.exit_code != 0 and "routed experts are packed at int4/int8" in refused.output, refused.output
        assert not (tmp_path / "again").exists() and not (tmp_path / "p2").exists()


@pytest.mark.parametrize("given,words", [
    ({"bits": [8, 4], "sparsity": 0.5}, "needs a budget in bytes; give --memory SIZE or --memory-ratio R"),
    ({"bits": [5], "memory_ratio": 0.5}, "bit-width 5 is not one allocopt quantizes experts to"),
    ({"bits": [4], "memory_ratio": 0.5, "optimizer": "dp"}, "dp searches counts only: drop --optimizer or --bits"),
])
def test_bad_bits_requests_are_refused_before_anything_loads(given, words):
    with pytest.raises(AllocoptError, match=words):
        RunConfig.from_sources(None, given)


def test_nsga2_with_bits_writes_a_front_of_export_bytes_that_allocopt_plot_draws(tmp_path):
    runner = CliRunner()
    done = runner.invoke(cli, ["run", "--optimizer", "nsga2", "--bits", "8,4", "--memory-ratio", "0.5", "--evals", "24",
                               "--population", "6", "--num-seqs", "4", "--out", str(tmp_path / "run"), "--name", "front",
                               "--quiet"])
    assert done.exit_code == 0, done.output
    front = json.loads((tmp_path / "run" / "front.json").read_text())["points"]
    sizes = [p["memory_bytes"] for p in front]
    assert len(front) >= 2 and sizes == sorted(sizes) and all(p["bits"] for p in front)
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert sizes[-1] <= plan.extra["memory_budget_bytes"]
    drawn = runner.invoke(cli, ["plot", "pareto", str(tmp_path / "run"), "--out", str(tmp_path / "plots")])
    assert drawn.exit_code == 0, drawn.output
    summary = json.loads((tmp_path / "plots" / "pareto.json").read_text())
    assert summary["front_points"] >= 2 and summary["uniform_points"] >= 1
    assert summary["reference_memory_bytes"] == plan.extra["full_export_bytes"]
    with open(tmp_path / "plots" / "pareto.csv") as fh:                 # counts and bit-widths in their own columns
        rows = list(csv.DictReader(fh))
    layers = len(plan.layers)
    assert rows and all(len(r["counts"].split()) == len(r["bits"].split()) == layers for r in rows)
    assert {int(b) for r in rows for b in r["bits"].split()} <= {0, 8, 4}
    assert all(max(map(int, r["counts"].split())) > 2 for r in rows)   # counts, not option indices 0..2


def test_a_bits_search_races_and_every_plan_it_scores_respects_the_serving_constraints(tmp_path):
    """Two micro-batches of search rows: offspring are raced (PRUNED trials with bits params), survivors COMPLETE;
    every plan scored, raced out or not, keeps --allowed-counts and --count-multiple."""
    allowed = {8, 12, 16}                                   # --allowed-counts 6,8,10,12,16 that are multiples of 4
    done = CliRunner().invoke(cli, ["run", "--bits", "8,4", "--memory-ratio", "0.35", "--evals", "30", "--num-seqs", "8",
                                    "--allowed-counts", "6,8,10,12,16", "--count-multiple", "4",
                                    "--out", str(tmp_path / "run"), "--name", "c", "--quiet"])
    assert done.exit_code == 0, done.output
    trials = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'c.db'}").trials
    layers = [k for k in trials[0].params if k.startswith("layer_")]
    assert len(trials) > 5 and all({t.params[k] for k in layers} <= allowed for t in trials)
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert set(plan.counts) <= allowed
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert plan.extra["racing"] == "on" and len(pruned) == plan.extra["pruned"] > 0
    assert all(any(k.startswith("bits_") for k in t.params) and t.intermediate_values for t in pruned)
    assert plan.extra["evaluation_equivalents"] <= 30 and plan.extra["from_study"] == 0     # a fresh study
    # The convergence plot's best is the plan's: over-budget DP probes are off budget by the trials' own constraints.
    drawn = CliRunner().invoke(cli, ["plot", "convergence", str(tmp_path / "run"), "--out", str(tmp_path / "plots")])
    assert drawn.exit_code == 0, drawn.output
    [curve] = json.loads(next((tmp_path / "plots").glob("*.json")).read_text())["curves"]
    assert curve["best_esap"] == pytest.approx(plan.extra["esap"])


def test_options_of_a_bits_search_are_its_own(tmp_path):
    """ga --bits takes ga's options that apply in two dimensions and refuses the rest in one line; nsga2 --bits takes
    none."""
    runner = CliRunner()
    common = ["run", "--bits", "8,4", "--memory-ratio", "0.35", "--out", str(tmp_path / "run"), "--quiet"]
    refused = runner.invoke(cli, [*common, "--option", "crossover_prob=0.5"])
    assert refused.exit_code != 0 and "not an option of optimizer 'ga --bits'" in refused.output
    refused = runner.invoke(cli, [*common, "--optimizer", "nsga2", "--option", "mutation_max_delta=2"])
    assert refused.exit_code != 0 and "'nsga2 --bits' takes no options" in refused.output
    done = runner.invoke(cli, [*common, "--option", "racing=false", "--option", "warm_start=false", "--evals", "12",
                               "--num-seqs", "8", "--name", "o"])
    assert done.exit_code == 0, done.output
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.extra["pruned"] == 0 and plan.extra["racing"] is None
    assert "dp warm start" not in plan.extra["search_phases"]


def test_workers_score_joint_plans_with_their_bits(tmp_path):
    """A second process evaluates WAITING trials from their recorded kept ids and bit-widths: every trial's value is
    what this process's engine gives the same (kept set, bits)."""
    import types

    from allocopt.data import load_tokens
    from allocopt.objectives import Evaluator
    from allocopt.search.study import KEPT, LAYER_BITS

    done = CliRunner().invoke(cli, ["run", "--bits", "8,4", "--memory-ratio", "0.35", "--evals", "12", "--num-seqs", "4",
                                    "--workers", "2", "--out", str(tmp_path / "run"), "--name", "w", "--quiet"])
    assert done.exit_code == 0, done.output
    trials = [t for t in optuna.load_study(study_name="w", storage=f"sqlite:///{tmp_path / 'w.db'}").trials
              if t.state == optuna.trial.TrialState.COMPLETE]
    owners = {t.user_attrs.get("owner") for t in trials}
    assert len(owners) == 2, owners                                    # both processes scored plans
    model, tokenizer = load_model("testbed")
    ev = Evaluator(model, load_tokens("testbed:mix", tokenizer, 256, 4, split="search"))
    plans = [types.SimpleNamespace(kept={int(l): k for l, k in t.user_attrs[KEPT].items()},
                                   bits={int(l): b for l, b in t.user_attrs.get(LAYER_BITS, {}).items()}) for t in trials]
    assert any(p.bits for p in plans)
    assert [t.value for t in trials] == pytest.approx([v.value for v in ev.evaluate(plans)], abs=1e-6)


def test_a_study_is_resumed_only_by_the_same_space_and_objectives(tmp_path):
    """A --bits study refuses another --bits list, a count-only search and nsga2's two objectives in one line each,
    and a count-only study refuses nsga2 too: trials from another space or objective count would mix in silently."""
    runner = CliRunner()

    def run(*extra, name="s"):
        return runner.invoke(cli, ["run", "--evals", "4", "--num-seqs", "4", "--out", str(tmp_path / name),
                                   "--name", name, "--quiet", "--option", "warm_start=false", *extra])

    first = run("--bits", "8,4", "--memory-ratio", "0.35")
    assert first.exit_code == 0, first.output
    for extra, words in [(("--bits", "8", "--memory-ratio", "0.35"), "searched with another --bits"),
                         (("--memory-ratio", "0.7"), "searched with another"),
                         (("--bits", "8,4", "--memory-ratio", "0.35", "--optimizer", "nsga2"), "has 1 objective(s)")]:
        if "nsga2" in extra:
            extra = (*extra, "--population", "4")
            done = runner.invoke(cli, ["run", "--evals", "4", "--num-seqs", "4", "--out", str(tmp_path / "s"),
                                       "--name", "s", "--quiet", *extra])
        else:
            done = run(*extra)
        assert done.exit_code != 0 and words in done.output and "new --name" in done.output, done.output
        assert len(done.output.strip().splitlines()) == 1
    count_only = runner.invoke(cli, ["run", "--evals", "4", "--num-seqs", "4", "--sparsity", "0.5", "--out",
                                     str(tmp_path / "c"), "--name", "c", "--quiet", "--optimizer", "uniform"])
    assert count_only.exit_code == 0, count_only.output
    front = runner.invoke(cli, ["run", "--evals", "4", "--num-seqs", "4", "--sparsity", "0.5", "--out",
                                str(tmp_path / "c"), "--name", "c", "--quiet", "--optimizer", "nsga2", "--population", "4"])
    assert front.exit_code != 0 and "has 1 objective(s)" in front.output, front.output
