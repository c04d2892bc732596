"""`allocopt esap` on a saved tiny model with a word-level tokenizer and a plain .txt file."""
from __future__ import annotations

import json
import random

from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from allocopt.cli.main import cli
from allocopt.models import describe
from allocopt.testing.tiny import build_tiny_model
from allocopt.plan import Plan

WORDS = [f"w{i}" for i in range(200)]


def _checkpoint(tmp_path):
    model = build_tiny_model("olmoe", seed=0)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "model")
    return describe(model)


def test_cli_esap_on_txt_scores_k_times_n_minus_1_tokens(tmp_path):
    info = _checkpoint(tmp_path)
    rng = random.Random(0)
    (tmp_path / "search.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(500)))
    ranking = {l: list(range(e)) for l, e in info.num_experts.items()}
    half = Plan.from_counts(info.fingerprint, ranking, info.num_experts, {l: e // 2 for l, e in info.num_experts.items()})
    half.save(tmp_path / "half.json")
    Plan.identity(info.fingerprint, info.num_experts).save(tmp_path / "full.json")
    out = {}
    for name in ("half", "full"):
        res = CliRunner().invoke(cli, ["esap", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / f"{name}.json"),
                                       "--data", str(tmp_path / "search.txt"), "--seq-len", "32", "--num-seqs", "5", "--json"])
        assert res.exit_code == 0, res.output
        out[name] = json.loads(res.output.strip().splitlines()[-1])
    assert out["full"]["esap"] == 1.0 and out["full"]["tokens"] == 5 * 31
    lo, hi = out["half"]["bound"]
    assert out["half"]["tokens"] == 5 * 31 and 0 < lo <= out["half"]["esap"] <= hi < 1


def test_cli_rejects_plan_for_another_model(tmp_path):
    _checkpoint(tmp_path)
    other = describe(build_tiny_model("olmoe", seed=9))
    Plan.identity(other.fingerprint, other.num_experts).save(tmp_path / "p.json")
    (tmp_path / "s.txt").write_text(" ".join(WORDS))
    res = CliRunner().invoke(cli, ["esap", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "p.json"),
                                   "--data", str(tmp_path / "s.txt"), "--seq-len", "16", "--num-seqs", "2"])
    assert res.exit_code == 2 and "another model" in res.output
