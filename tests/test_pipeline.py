"""The run pipeline does each thing once: config.json read once per command, the criterion parsed once and scored
once, the Evaluator built once; and esap/run build their work through the same `prepare`."""
from __future__ import annotations

import builtins
import io
import json

import pytest
from click.testing import CliRunner

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
