"""The testbed training loop (``allocopt.testbed.train``): a run saved and resumed gives the weights of one that was
not interrupted, for any recipe (issue 22: the deep testbed takes longer to train than one sitting)."""
from __future__ import annotations

import random
import types

import torch
from safetensors.torch import load_file
from transformers import OlmoeConfig, OlmoeForCausalLM

from allocopt.data.tokens import Document
from allocopt.testbed import train

TEXT = " ".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(400))
PROSE = " ".join(f"The river number {i} runs past the old mill and the quiet town." for i in range(300))


def _corpus() -> types.ModuleType:
    module = types.ModuleType("tiny_corpus")
    module.documents = lambda domain, split: [Document(text=TEXT if domain == "code" else PROSE)]
    module.math_worksheet = lambda rng, split: Document(
        text="\n".join(f"{a}+{b}={a + b}" for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(20))))
    return module


def _config(vocab: int, eos: int, pad: int) -> OlmoeConfig:
    return OlmoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, bos_token_id=eos, eos_token_id=eos,
                       pad_token_id=pad, tie_word_embeddings=False, router_aux_loss_coef=0.01)


def test_a_resumed_run_gives_the_weights_of_an_uninterrupted_one(tmp_path):
    corpus = _corpus()
    recipe = train.Recipe("tiny", lambda: corpus, _config, lambda: OlmoeForCausalLM, lambda: tmp_path / "unused",
                          {"math": 1, "code": 1, "prose": 1}, steps=6, vocab_size=300)
    random.seed(0)
    whole = train.train(tmp_path / "whole", 6, 60.0, 3, recipe)
    train.train(tmp_path / "first", 6, 0.0, 3, recipe, work=tmp_path / "state", save_every=1)   # capped after 1 step
    resumed = train.train(tmp_path / "resumed", 6, 60.0, 3, recipe, work=tmp_path / "state", save_every=2)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in whole["curve"]] == [r["loss"] for r in resumed["curve"]]
    assert resumed["recipe"] == "tiny" and "capped_at_step" not in resumed
