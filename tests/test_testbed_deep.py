"""The deep testbed's corpus and tasks (issue 22): shipped splits, word problems, the tasks built from them."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.evaluation import tasks
from allocopt.testbed.corpus import split_of
from allocopt.testbed.deep import corpus, problems


@pytest.mark.parametrize("form", sorted(problems.FORMS))
def test_every_word_problem_form_has_a_whole_non_negative_answer_and_is_recognised(form):
    rng = random.Random(form)
    make = problems.FORMS[form][0]
    for _ in range(300):
        question, answer = make(rng)
        assert isinstance(answer, int) and answer >= 0 and "=" not in question
        assert problems.form_of(question) == form


def test_word_problems_compute_what_they_say():
    rng = random.Random(0)
    for _ in range(200):
        question, answer = problems.FORMS["gain_loss"][0](rng)       # "X has a T, gets b more and gives away c."
        words = question.replace(",", "").replace(".", "").split()
        a, b, c = int(words[2]), int(words[5]), int(words[10])
        assert answer == a + b - c
        question, answer = problems.FORMS["packs"][0](rng)           # "X buys a packs of b T and finds c more."
        words = question.split()
        assert answer == int(words[2]) * int(words[5]) + int(words[9])


def test_shipped_splits_are_the_held_out_text_and_never_training_text():
    for split in ("calibration", "search", "heldout"):
        docs = {d: corpus.documents(d, split) for d in ("code", "prose", "math")}
        assert all(docs.values()), split
        assert sum(len(x.text) for x in docs["code"]) <= corpus.SHIPPED_CHARS["code"]
    for doc in corpus.documents("math", "heldout"):
        for line in doc.text.split("\n"):
            assert split_of("deep-math:" + line.rsplit("=", 1)[0]) == "heldout"
    rng = random.Random(7)
    train = {line.rsplit("=", 1)[0] for _ in range(50) for line in corpus.math_worksheet(rng, "train").text.split("\n")}
    held = {item["prompt"].rsplit("\n", 1)[1][:-1] for item in tasks.math_items(corpus)}
    assert train and held and not train & held


def test_deep_tasks_have_items_of_every_kind():
    math = tasks.math_items(corpus)
    assert {m["form"] for m in math} == set(problems.FORMS)
    assert len(tasks.code_items(corpus)) >= 100
    for domain in ("code", "prose", "math"):
        items = tasks.mc_items(domain, corpus)
        assert len(items) >= 100 and all(len(i["choices"]) == tasks.MC_CHOICES for i in items)


def test_eval_takes_the_deep_tasks_for_any_model(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--model", "testbed", "--tasks-from", "deep", "--limit", "2",
                                      "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["corpus"] == "deep" and set(metrics["ppl"]) == {"code", "prose", "math"}
    assert set(metrics["math_em_by_form"]) <= set(problems.FORMS)


def test_the_data_source_reads_the_deep_corpus():
    from allocopt.data import load_tokens
    from allocopt.runtime import load_model

    _, tokenizer = load_model("testbed")
    tokens = load_tokens("deep:mix", tokenizer, 64, 4, split="calibration")
    assert tokens.input_ids.shape == (4, 64)


# ---- the shipped checkpoint ------------------------------------------------------------------------------------

def test_the_shipped_deep_testbed_is_in_the_regime_the_issue_asks_for():
    """At least 12 MoE layers of at least 64 routed experts with top-8, expert width between hidden/4 and hidden/2,
    a shared expert, a family other than OLMoE with transformers and vLLM classes, a BPE vocabulary of at least 4096,
    at most 25 MB on disk."""
    from allocopt.models import describe
    from allocopt.models.engines import VLLM_ARCHITECTURES
    from allocopt.runtime import load_model
    from allocopt.testbed import deep

    files = list(deep.path().glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 25 * 10**6
    model, tokenizer = load_model("testbed-deep")
    info, config = describe(model), model.config
    assert len(info.num_experts) >= 12 and set(info.num_experts.values()) == {64} and set(info.top_k.values()) == {8}
    assert config.hidden_size / 4 <= config.moe_intermediate_size <= config.hidden_size / 2
    assert config.shared_expert_intermediate_size > 0 and config.model_type != "olmoe"
    assert config.architectures[0] in VLLM_ARCHITECTURES and len(tokenizer) >= 4096
    log = json.loads((deep.path() / "train_log.json").read_text())
    assert log["recipe"] == "deep" and "capped_at_step" not in log


def test_the_deep_testbed_runs_the_main_job_end_to_end(tmp_path):
    """observe, rank, a few plans searched and the plan exported, on the deep testbed and its own data (the default
    for --model testbed-deep, recorded in plan.json, and what `esap --plan` scores the plan on unless told)."""
    from allocopt.config import shipped_corpus
    from allocopt.models import describe, load_pruned

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--model", "testbed-deep", "--sparsity", "0.5", "--evals", "6",
                                      "--calib-num-seqs", "4", "--num-seqs", "2", "--out", str(out),
                                      "--optimizer", "uniform", "--quiet"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["calib_data"] == plan["search_data"] == "deep:mix" and plan["search_num_seqs"] == 2
    scored = CliRunner().invoke(cli, ["esap", "--model", "testbed-deep", "--plan", str(out / "plan.json"), "--json"])
    assert scored.exit_code == 0, scored.output
    again = json.loads(scored.output.strip().splitlines()[-1])
    assert again["data"] == "deep:mix" and again["esap"] == pytest.approx(plan["esap"], abs=1e-9)
    exported = CliRunner().invoke(cli, ["prune", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "pruned")])
    assert exported.exit_code == 0, exported.output
    counts = describe(load_pruned(tmp_path / "pruned")).num_experts
    assert sum(counts.values()) == sum(len(l["kept"]) for l in plan["layers"]) == 12 * 32
    assert shipped_corpus(tmp_path / "pruned") == "deep"         # eval's tasks and run's data follow the source model


def test_a_shipped_testbed_defaults_to_its_own_corpus_and_other_models_to_the_first():
    from allocopt import defaults
    from allocopt.config import RunConfig

    deep = RunConfig.from_sources(None, {"model": "testbed-deep"})
    assert (deep.calib_data, deep.search_data) == ("deep:mix", "deep:mix")
    first = RunConfig.from_sources(None, {"model": "testbed"})
    assert (first.calib_data, first.search_data) == (defaults.CALIBRATION_DATA, defaults.SEARCH_DATA)
    mine = RunConfig.from_sources(None, {"model": "/some/checkpoint", "search_data": "mine.txt"})
    assert (mine.calib_data, mine.search_data) == (defaults.CALIBRATION_DATA, "mine.txt")
    problem = Path(__file__).resolve().parent.parent / "problems" / "testbed-deep-50.toml"
    assert RunConfig.from_sources(problem, {"data": "testbed:code"}).search_data == "testbed:code"   # a given one wins


def test_the_training_manifest_pins_which_documents_train_and_refuses_a_changed_one(tmp_path, monkeypatch):
    """The training split reads the manifest's documents only (another machine's extra distributions are not read),
    and the recipe's check refuses a machine whose text differs, naming a document and the versions to install."""
    import gzip

    from allocopt.errors import AllocoptError

    here = {"code": (("stdlib/a.py", "x = 1"), ("stdlib/b.py", "y = 2"), ("extra/c.py", "z = 3")), "prose": ()}
    monkeypatch.setattr(corpus, "_items", lambda domain: here[domain])
    manifest = tmp_path / "train_manifest.json.gz"
    listed = [["stdlib/b.py", corpus._sha("y = 2")], ["stdlib/a.py", corpus._sha("x = 1")]]
    with gzip.open(manifest, "wt", encoding="utf-8") as f:
        json.dump({"sources": {"python": "3.11.7"}, "documents": {"code": listed, "prose": []}}, f)
    monkeypatch.setattr(corpus, "MANIFEST", manifest)
    for cached in (corpus._manifest, corpus._train):
        cached.cache_clear()
    try:
        assert [d.text for d in corpus.documents("code", "train")] == ["y = 2", "x = 1"]   # its order, no extra
        corpus.check_train_corpus()
        here["code"] = (("stdlib/a.py", "x = 10"), ("stdlib/b.py", "y = 2"))
        with pytest.raises(AllocoptError, match=r"1 of 2 training documents .* \(e\.g\. stdlib/a\.py\); install .*python 3\.11\.7"):
            corpus.check_train_corpus()
    finally:
        for cached in (corpus._manifest, corpus._train):
            cached.cache_clear()
