"""lm-evaluation-harness on allocopt checkpoints, offline, on a task written to a temp folder.

lm-eval must agree with allocopt's own scorer: the same (context, choice) pairs get the same log-likelihoods,
so its accuracies and perplexity can be recomputed here from ``continuation_logprobs``.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.evaluation.likelihood import continuation_logprobs, multiple_choice_accuracy
from allocopt.models import describe
from allocopt.runtime import load_model
from allocopt.export import save_pruned
from lm_eval_kit import ITEMS, LL_TASK, MC_TASK


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed")


def test_lm_eval_scores_equal_allocopt_loglikelihoods(lm_eval_offline, task_dir, items, testbed):
    from allocopt.evaluation.lm_eval_adapter import evaluate_lm, metric_table

    model, tokenizer = testbed
    results = evaluate_lm(model, tokenizer, [MC_TASK, LL_TASK], include_path=task_dir, log_samples=True)
    samples = sorted(results["samples"][MC_TASK], key=lambda s: s["doc_id"])
    assert len(samples) == ITEMS

    pairs = [(item["context"], choice) for item in items for choice in item["choices"]]
    ours = continuation_logprobs(model, tokenizer, pairs)
    theirs = [ll for sample in samples for ll, _ in sample["filtered_resps"]]
    assert [tuple(a) for s in samples for a in s["arguments"]] == pairs
    assert theirs == pytest.approx(ours, abs=1e-4)

    table = metric_table(results)
    raw_acc, i = 0, 0
    for item in items:
        n = len(item["choices"])
        raw_acc += int(max(range(n), key=lambda j: ours[i + j]) == item["answer"])
        i += n
    assert table[f"{MC_TASK}/acc"] == pytest.approx(raw_acc / ITEMS)
    assert table[f"{MC_TASK}/acc_norm"] == pytest.approx(multiple_choice_accuracy(model, tokenizer, items))
    assert table[f"{MC_TASK}/acc"] > 0.25                     # the testbed does arithmetic better than chance

    answers = continuation_logprobs(model, tokenizer, [(it["context"], it["choices"][it["answer"]]) for it in items])
    assert table[f"{LL_TASK}/perplexity"] == pytest.approx(math.exp(-sum(answers) / ITEMS), rel=1e-4)


def test_eval_cli_runs_lm_eval_on_a_pruned_export(lm_eval_offline, task_dir, items, tmp_path):
    model, tokenizer = load_model("testbed")                 # pruned in place, so not the shared fixture
    counts = [16, 12, 8, 6, 4, 10]
    kept = {layer.index: list(range(c)) for layer, c in zip(describe(model).layers, counts)}
    export = save_pruned(model, tokenizer, tmp_path / "pruned", kept)
    out = tmp_path / "metrics.json"

    result = CliRunner().invoke(cli, ["eval", "--model", str(export), "--lm-eval-tasks", MC_TASK,
                                      "--lm-eval-include", str(task_dir), "--limit", "6", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics == json.loads(out.read_text(encoding="utf-8"))
    assert set(metrics["lm_eval"]) >= {f"{MC_TASK}/acc", f"{MC_TASK}/acc_norm", f"{MC_TASK}/acc_stderr"}

    pruned, pruned_tokenizer = load_model(export)
    assert [layer.num_experts for layer in describe(pruned).layers] == counts
    expected = multiple_choice_accuracy(pruned, pruned_tokenizer, items[:6])
    assert metrics["lm_eval"][f"{MC_TASK}/acc_norm"] == pytest.approx(expected)
    assert 0.0 <= expected <= 1.0


def test_eval_cli_errors_without_lm_eval_are_one_line(task_dir, monkeypatch):
    runner = CliRunner()
    orphan = runner.invoke(cli, ["eval", "--lm-eval-include", str(task_dir)])
    assert orphan.exit_code == 2 and "--lm-eval-include needs --lm-eval-tasks" in orphan.output

    monkeypatch.setitem(sys.modules, "lm_eval", None)        # as if the extra were not installed
    missing = runner.invoke(cli, ["eval", "--lm-eval-tasks", MC_TASK, "--lm-eval-include", str(task_dir)])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == ['error: lm-evaluation-harness is not installed (lm_eval is '
                                                   'missing); pip install "allocopt[lm-eval]"']


def test_unknown_lm_eval_task_is_a_one_line_error(lm_eval_offline, task_dir):
    typo = CliRunner().invoke(cli, ["eval", "--lm-eval-tasks", f"{MC_TASK},no_such_task_xyz",
                                    "--lm-eval-include", str(task_dir)])
    assert typo.exit_code == 2
    assert typo.output.startswith("error: lm-eval task(s) no_such_task_xyz not found in lm-eval's built-in tasks or")
    assert len(typo.output.strip().splitlines()) == 1
