"""The run pipeline does each thing once: config.json read once per command, the criterion parsed once and scored
once, the Evaluator built once; and esap/run build their work through the same `prepare`."""
from __future__ import annotations

import builtins
import io
import json

import pytest
from click.testing import CliRunner

from allocopt.config import RunConfig
from allocopt import criteria
from allocopt.cli.main import cli
from allocopt.objectives import engine
from reliability_kit import make_root, run_args


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture
def config_reads(root, monkeypatch):
    """How many times the model's config.json is opened (allocopt's own reads and transformers')."""
    target, real, opened = str(root / "model" / "config.json"), io.open, []

    def counting(file, *args, **kwargs):
        if str(file) == target:
            opened.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    return opened


def test_run_reads_config_once_parses_and_scores_the_criterion_once_and_builds_one_evaluator(root, config_reads,
                                                                                                monkeypatch):
    parses, scores, evaluators = [], [], []
    real_parse, real_reap, real_init = criteria._parse, criteria._BUILTINS["reap"], engine.Evaluator.__init__
    monkeypatch.setattr(criteria, "_parse", lambda spec: parses.append(spec) or real_parse(spec))
    monkeypatch.setitem(criteria._BUILTINS, "reap", lambda stats: scores.append(1) or real_reap(stats))
    monkeypatch.setattr(engine.Evaluator, "__init__",
                        lambda self, *a, **k: evaluators.append(1) or real_init(self, *a, **k))
    result = CliRunner().invoke(cli, run_args(root, "once", "--optimizer", "ga", "--evals", "6", "--json"))
    assert result.exit_code == 0, result.output
    assert (len(config_reads), parses, len(scores), len(evaluators)) == (1, ["reap"], 1, 1)
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["objective"] == "esap" and summary["value"] >= summary["uniform_value"]


def test_esap_reads_config_once_and_scores_the_plan_the_run_wrote(root, config_reads):
    run = CliRunner().invoke(cli, run_args(root, "for-esap", "--optimizer", "uniform", "--json"))
    assert run.exit_code == 0, run.output
    config_reads.clear()
    plan = root / "runs" / "for-esap" / "plan.json"
    result = CliRunner().invoke(cli, ["esap", "--model", str(root / "model"), "--plan", str(plan), "--data",
                                      str(root / "data.txt"), "--seq-len", "24", "--num-seqs", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert len(config_reads) == 1
    value = json.loads(result.output.strip().splitlines()[-1])["esap"]
    assert value == pytest.approx(json.loads(plan.read_text())["value"], abs=1e-9)


@pytest.mark.parametrize("optimizer, given, noted", [
    ("ga", {"population": 8}, True),                     # ga's generations are its offspring option: ignored
    ("dp", {"population": 8}, True),
    ("evoesap", {"population": 8}, False),               # EvoESAP's generation is --population plans
    ("nsga2", {"population": 8}, False),
    ("ga", {"population": 8, "generations": 3}, False),  # the budget is 3 x 8 evaluations: it counts
    ("ga", {}, False),                                   # the default, not given
])
def test_a_population_the_optimizer_does_not_use_is_noted(optimizer, given, noted, caplog, tmp_path):
    """``--population`` on the command line for an optimizer that does not size generations by it changed nothing,
    silently; now a note says so (a problem file's population, written for several optimizers, is not noted)."""
    from allocopt.pipeline.prepare import check_options

    config = RunConfig.from_sources(None, {"optimizer": optimizer, **given, "out": str(tmp_path)})
    with caplog.at_level("INFO", logger="allocopt"):
        check_options(config, None)
    notes = [r.getMessage() for r in caplog.records if "does not use --population" in r.getMessage()]
    assert notes == ([f"{optimizer} does not use --population 8 (its generations are sized by its own options; "
                      "--population counts only with --generations, as generations x population evaluations): it "
                      "changes nothing in this run"] if noted else [])


def test_a_problem_files_population_is_not_noted(caplog, tmp_path):
    from allocopt.pipeline.prepare import check_options

    problem = tmp_path / "p.toml"
    problem.write_text('optimizer = "ga"\npopulation = 32\nevals = 100\n')
    config = RunConfig.from_sources(problem, {"out": str(tmp_path)})
    with caplog.at_level("INFO", logger="allocopt"):
        check_options(config, None)
    assert config.population == 32 and config.source_of("population") == f"problem file {problem}"
    assert not [r for r in caplog.records if "--population" in r.getMessage()]
