"""The testbed: corpus splits, tokenizer, shipped checkpoint and the ``testbed:`` data source."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import allocopt.testbed as testbed
from allocopt.data import load_tokens
from allocopt.errors import AllocoptError
from allocopt.testbed import corpus


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(testbed.path())


def _problems(docs) -> set[str]:
    return {line.split("=")[0] for d in docs for line in d.text.split("\n")}


def test_corpus_is_deterministic():
    first = {(d, s): corpus.documents(d, s) for d in ("prose", "math") for s in corpus.SPLITS}
    for builder in (corpus._prose, corpus._math):
        builder.cache_clear()
    assert first == {(d, s): corpus.documents(d, s) for d in ("prose", "math") for s in corpus.SPLITS}


def test_every_split_has_documents_and_splits_are_disjoint():
    for domain in ("code", "prose"):
        texts = {s: {d.text for d in corpus.documents(domain, s)} for s in corpus.SPLITS}
        assert all(texts.values()), f"{domain} has an empty split"
        for a in corpus.SPLITS:
            for b in corpus.SPLITS:
                if a < b:
                    assert not texts[a] & texts[b]


def test_heldout_math_never_occurs_in_training():
    heldout = _problems(corpus.documents("math", "heldout"))
    assert len(heldout) > 300
    train = _problems(corpus.documents("math", "train"))
    rng = random.Random(7)   # the training script draws fresh worksheets from the same split function
    train |= _problems([corpus.math_worksheet(rng, "train") for _ in range(500)])
    assert not heldout & train
    for split in ("calibration", "search"):
        assert not heldout & _problems(corpus.documents("math", split))


def test_math_answers_are_exact():
    for line in corpus.documents("math", "heldout")[0].text.split("\n"):
        question, answer = line.split("=")
        assert eval(question) == int(answer)   # noqa: S307 (our own generated arithmetic)


def test_mix_interleaves_domains_in_fixed_order():
    mix = corpus.documents("mix", "heldout")
    parts = [corpus.documents(d, "heldout") for d in ("code", "prose", "math")]
    assert mix[:3] == [parts[0][0], parts[1][0], parts[2][0]]
    assert len(mix) == sum(len(p) for p in parts)


def test_unknown_domain_is_a_user_error():
    with pytest.raises(AllocoptError, match="unknown testbed domain"):
        corpus.documents("poetry", "train")


def test_tokenizer_round_trips_and_splits_digits(tokenizer):
    samples = [corpus.documents("code", "heldout")[0].text[:2000], corpus.documents("prose", "heldout")[0].text[:2000],
               corpus.documents("math", "heldout")[0].text, "héllo wörld → ∑ 🙂\t\n  x"]
    for text in samples:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("1234+567=1801", add_special_tokens=False)["input_ids"])
    assert tokens == list("1234+567=1801")
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_shipped_checkpoint_loads_with_plain_transformers(tokenizer):
    path = testbed.path()
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "OlmoeForCausalLM"
    assert model.config.num_experts >= 16 and model.config.num_hidden_layers >= 4
    ids = tokenizer("12+30=", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(tokenizer)


def test_train_log_records_a_falling_loss_per_domain():
    log = json.loads((testbed.path() / "train_log.json").read_text())
    first, last = log["curve"][0]["loss"], log["curve"][-1]["loss"]
    assert set(first) == {"code", "prose", "math"}
    assert all(last[d] < first[d] - 1.0 for d in first)


def test_testbed_data_spec_goes_through_load_tokens(tokenizer):
    tokens = load_tokens("testbed:math", tokenizer, seq_len=64, num_seqs=4, split="heldout")
    assert tokens.input_ids.shape == (4, 64) and tokens.num_scored > 0
    text = tokenizer.decode(tokens.input_ids[0][tokens.attention_mask[0].bool()])
    assert text.split("\n")[0].split("=")[0] in _problems(corpus.documents("math", "heldout"))
