"""Held-out evaluation on the shipped testbed: sane values, batching-invariant generation, exact scoring."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.data.tokens import documents_to_tokens
from allocopt.evaluation import evaluate, tasks
from allocopt.evaluation.generation import greedy_continuations
from allocopt.evaluation.likelihood import continuation_logprobs
from allocopt.evaluation.perplexity import perplexity
from allocopt.models import find_moe_blocks, mask_experts
from allocopt.runtime import load_model
from allocopt.testbed import corpus


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed")


def test_shipped_model_meets_its_heldout_goals(testbed):
    model, tokenizer = testbed
    metrics = evaluate(model, tokenizer, limit=100)
    assert metrics["math_em"] >= 0.5
    assert set(metrics["ppl"]) == {"code", "prose", "math"}
    assert all(math.isfinite(v) and 1.0 < v < len(tokenizer) for v in metrics["ppl"].values())
    assert 0.25 < metrics["mc_acc"] <= 1.0          # better than 4-way chance
    assert 0.0 <= metrics["code_em"] <= 1.0
    assert 0.2 < metrics["code_edit_sim"] <= 1.0    # partial credit where exact match has none


def test_greedy_generation_does_not_depend_on_batching(testbed):
    model, tokenizer = testbed
    prompts = [item["prompt"] for item in tasks.math_items()[:6]] + [tasks.code_items()[0]["prompt"]]
    batched = greedy_continuations(model, tokenizer, prompts, max_new_tokens=6, batch_size=len(prompts))
    single = [greedy_continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_perplexity_ignores_padding(testbed):
    model, tokenizer = testbed
    docs = corpus.documents("math", "heldout")[:3]
    padded = documents_to_tokens([corpus.Document(d.text[: 40 + 30 * i]) for i, d in enumerate(docs)], tokenizer, 64, 3, "t")
    assert (padded.attention_mask == 0).any()
    nll = 0.0
    for row in range(3):
        n = int(padded.attention_mask[row].sum())
        ids = padded.input_ids[row:row + 1, :n]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
    assert perplexity(model, padded, batch_size=3) == pytest.approx(math.exp(nll / padded.num_scored), rel=1e-4)


def test_continuation_logprob_matches_a_direct_forward(testbed):
    model, tokenizer = testbed
    pairs = [("3+4=", "7\n"), ("def f(x):", "\n    return x")]
    scores = continuation_logprobs(model, tokenizer, pairs)
    for (context, continuation), score in zip(pairs, scores):
        c = tokenizer(context, add_special_tokens=False)["input_ids"]
        x = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([c + x])).logits[0], -1)
        assert score == pytest.approx(sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x)), abs=1e-4)


def test_masking_most_experts_hurts_math_and_unmasking_restores_it(testbed):
    model, tokenizer = testbed
    before = evaluate(model, tokenizer, limit=40)
    top_k = find_moe_blocks(model)[0].info.top_k
    with mask_experts(model, {b.layer: list(range(top_k)) for b in find_moe_blocks(model)}):
        masked = evaluate(model, tokenizer, limit=40)
    after = evaluate(model, tokenizer, limit=40)
    assert masked["math_em"] < before["math_em"] and masked["ppl"]["math"] > before["ppl"]["math"]
    assert after["math_em"] == before["math_em"] and after["ppl"] == before["ppl"]


def test_eval_cli_prints_json_last_and_writes_out(tmp_path):
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(cli, ["eval", "--model", "testbed", "--limit", "8", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert {"ppl", "math_em", "code_em", "mc_acc"} <= set(printed)
    assert json.loads(out.read_text()) == printed


def test_heldout_item_lists_are_fixed_and_heldout_only():
    items = tasks.math_items()
    tasks.math_items.cache_clear()
    assert tasks.math_items() == items
    train = {line.split("=")[0] for d in corpus.documents("math", "train") for line in d.text.split("\n")}
    assert not {i["prompt"].rsplit("\n", 1)[-1].rstrip("=") for i in items} & train
    for domain in ("math", "code", "prose"):
        mc = tasks.mc_items(domain)[:50]
        assert all(len(set(i["choices"])) == 4 and 0 <= i["answer"] < 4 for i in mc)


def test_exported_testbed_evaluates_like_the_masked_one_in_a_fresh_process(testbed, tmp_path):
    """A non-uniform 50% plan: `allocopt eval --plan` (masked, what the search scores) and `allocopt eval` on the
    `allocopt prune` export, each in its own interpreter, give the same held-out numbers."""
    from allocopt.models import describe
    from allocopt.plan import Plan
    from reliability_kit import allocopt as run_cli

    model, _ = testbed
    info = describe(model)
    ranking = {l: list(range(e))[::-1] for l, e in info.num_experts.items()}         # keep the highest ids
    counts = dict(zip(sorted(info.num_experts), [12, 10, 8, 8, 6, 4]))
    plan_path = Plan.from_counts(info.fingerprint, ranking, info.num_experts, counts).save(tmp_path / "plan.json")

    def allocopt(*args: str) -> dict:
        out = run_cli(*args, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1]) if args[0] == "eval" else {}

    allocopt("prune", "--plan", str(plan_path), "--model", "testbed", "--out", str(tmp_path / "pruned"), "--quiet")
    masked = allocopt("eval", "--model", "testbed", "--plan", str(plan_path), "--limit", "24", "--json")
    exported = allocopt("eval", "--model", str(tmp_path / "pruned"), "--limit", "24", "--json")
    assert exported["math_em"] == masked["math_em"] and exported["code_em"] == masked["code_em"]
    assert exported["code_edit_sim"] == pytest.approx(masked["code_edit_sim"], abs=1e-12)
    assert exported["mc_acc"] == masked["mc_acc"]
    for domain, ppl in masked["ppl"].items():
        assert exported["ppl"][domain] == pytest.approx(ppl, rel=1e-5)
    assert masked["ppl"] != evaluate(model, testbed[1], limit=24)["ppl"]      # the plan really prunes something
