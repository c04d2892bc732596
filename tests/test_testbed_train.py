"""The testbed training loop (``allocopt.testbed.train``): a run saved and resumed gives the weights of one that was
not interrupted, for any recipe (issue 22: the deep testbed takes longer to train than one sitting)."""
from __future__ import annotations

import dataclasses
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


def _recipe(tmp_path, phases) -> train.Recipe:
    corpus = _corpus()
    return train.Recipe("tiny", lambda: corpus, _config, lambda: OlmoeForCausalLM, lambda: tmp_path / "unused",
                        phases, vocab_size=300)


def test_a_resumed_run_gives_the_weights_of_an_uninterrupted_one(tmp_path):
    recipe = _recipe(tmp_path, (train.Phase(6, {"math": 1, "code": 1, "prose": 1}),))
    random.seed(0)
    whole = train.train(tmp_path / "whole", 6, 60.0, 3, recipe)
    train.train(tmp_path / "first", 6, 0.0, 3, recipe, work=tmp_path / "state", save_every=1)   # capped after 1 step
    state = torch.load(tmp_path / "state" / "state.pt", weights_only=False)
    torch.save(state | {"spent": 10**6}, tmp_path / "state" / "state.pt")   # earlier sittings don't count to --minutes
    resumed = train.train(tmp_path / "resumed", 6, 60.0, 3, recipe, work=tmp_path / "state", save_every=2)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in whole["curve"]] == [r["loss"] for r in resumed["curve"]]
    assert resumed["recipe"] == "tiny" and "capped_at_step" not in resumed


def test_a_run_resumed_into_a_later_phase_equals_one_that_ran_both_phases(tmp_path):
    """The deep recipe's annealing phase was added after its first phase had run: the state saved at the end of a
    one-phase run, resumed under the two-phase recipe, gives the weights of a two-phase run from scratch."""
    first = train.Phase(3, {"math": 1, "code": 1, "prose": 1}, warmup=1)
    second = train.Phase(3, {"math": 2, "code": 1, "prose": 0}, lr=1e-3, min_lr=1e-4, warmup=2)
    whole = train.train(tmp_path / "whole", 6, 60.0, 5, _recipe(tmp_path, (first, second)))
    train.train(tmp_path / "one", 3, 60.0, 5, _recipe(tmp_path, (first,)), work=tmp_path / "state")
    resumed = train.train(tmp_path / "resumed", 6, 60.0, 5, _recipe(tmp_path, (first, second)), work=tmp_path / "state")
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole["curve"][-1] | {"elapsed_s": 0} == resumed["curve"][-1] | {"elapsed_s": 0}
    assert resumed["steps"] == 6 and len(resumed["phases"]) == 2
    assert set(whole["curve"][-1]["loss"]) == {"math", "code"}        # the second phase's domains
    recipe = _recipe(tmp_path, (first, second))               # the second phase warms up again from its own start
    assert [recipe.phase_at(s)[0].lr_at(recipe.phase_at(s)[1]) for s in (2, 3, 4)] == [first.lr_at(2), 1e-3 / 2, 1e-3]


def test_expert_drop_routes_around_random_experts_and_a_resumed_run_still_matches(tmp_path):
    """The deep recipe's last phase trains with experts dropped from routing (structured dropout, LayerDrop's idea
    at expert granularity): the drops are drawn from the run's own seeded generator, so a run interrupted inside
    that phase resumes to the uninterrupted run's weights, and the drops change what is learned."""
    generator = torch.Generator().manual_seed(0)
    draws = [train.dropped_routing({0: 64, 3: 64}, 0.375, generator) for _ in range(200)]
    removed = [64 - len(k) for d in draws for k in d.values()]
    assert all(1 <= r <= 24 for r in removed) and max(removed) == 24      # k in 0..floor(0.375 x 64); 0 = left out
    assert all(set(k) <= set(range(64)) and k == sorted(k) for d in draws for k in d.values())
    assert 0.8 * 200 < sum(len(d) for d in draws) < 200 * 2              # most layer-steps drop some (24/25)

    plain = train.Phase(3, {"math": 1, "code": 1, "prose": 1}, warmup=1)
    drop = train.Phase(3, {"math": 1, "code": 1, "prose": 1}, lr=1e-3, warmup=1, expert_drop=0.5)
    whole = train.train(tmp_path / "whole", 6, 60.0, 7, _recipe(tmp_path, (plain, drop)))
    train.train(tmp_path / "cut", 6, 0.0, 7, _recipe(tmp_path, (plain, drop)), work=tmp_path / "state", save_every=1)
    train.train(tmp_path / "cut", 5, 60.0, 7, _recipe(tmp_path, (plain, drop)), work=tmp_path / "state", save_every=1)
    resumed = train.train(tmp_path / "resumed", 6, 60.0, 7, _recipe(tmp_path, (plain, drop)), work=tmp_path / "state")
    train.train(tmp_path / "undropped", 6, 60.0, 7, _recipe(tmp_path, (plain, dataclasses.replace(drop, expert_drop=0.0))))
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "resumed", "undropped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert whole["curve"][-1] | {"elapsed_s": 0} == resumed["curve"][-1] | {"elapsed_s": 0}
    assert whole["phases"][1]["expert_drop"] == 0.5
