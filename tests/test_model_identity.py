"""Two models are never taken for one (issue #21): the fingerprint covers every tensor, so a frozen-router fine-tune
(experts changed, router not) saved under the same directory name gets its own statistics and study, and the ESAP a
run reports is the one `allocopt esap` gives its plan on that model. The digests behind it are read once per machine."""
from __future__ import annotations

import json
import os

import optuna
import pytest
import torch
import transformers
from click.testing import CliRunner

from allocopt.calibration import RoutingStats
from allocopt.cli.main import cli
from allocopt.models import describe, identity
from allocopt.models.adapter import legacy_fingerprint
from allocopt.runtime import load_model
from allocopt.testing.tiny import build_tiny_model
from reliability_kit import make_root, save_tokenizer

SMALL = ["--seq-len", "32", "--num-seqs", "6", "--calib-num-seqs", "8", "--evals", "6", "--population", "3",
         "--sparsity", "0.5", "--criterion", "reap", "--optimizer", "random", "--quiet", "--json"]
SHARD = "50KB"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test its own digest cache (never the user's ~/.cache)."""
    monkeypatch.setenv("ALLOCOPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _save(model, directory) -> None:
    model.save_pretrained(directory, max_shard_size=SHARD)
    assert len(list(directory.glob("*.safetensors"))) > 3                  # really sharded


def _fine_tune_experts(directory, layer: int = 1, expert: int = 3) -> None:
    """What a frozen-router fine-tune leaves behind: one expert's weights changed, every router as it was, saved
    under the same directory name."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        w = model.model.layers[layer].mlp.experts.down_proj
        w[expert] += 0.5 * torch.randn(w[expert].shape, generator=torch.Generator().manual_seed(0))
    _save(model, directory)


def _run(root, name: str):
    return CliRunner().invoke(cli, ["run", "--model", str(root / "model"), "--data", str(root / "data.txt"), *SMALL,
                                    "--out", str(root / "runs" / name), "--name", name])


def _summary(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_a_frozen_router_fine_tune_is_another_model_end_to_end(tmp_path):
    root = make_root(tmp_path, model=False)
    save_tokenizer(root / "model")
    _save(build_tiny_model("olmoe", seed=3), root / "model")
    before, _ = load_model(root / "model")
    first = _summary(_run(root, "a"))
    assert json.loads((root / "runs" / "a" / "plan.json").read_text())["model_fingerprint"] == describe(before).fingerprint

    _fine_tune_experts(root / "model")
    after, _ = load_model(root / "model")
    assert legacy_fingerprint(after) == legacy_fingerprint(before)          # what the old scheme saw: the same model
    new_fp = describe(after).fingerprint
    assert new_fp != describe(before).fingerprint

    # A new run beside the first: statistics observed again (not taken from the sibling run dir), plan pinned to
    # the new model, and the ESAP it reports is what `allocopt esap` says about its plan on the new model.
    second = _summary(_run(root, "b"))
    stats_a = RoutingStats.load(root / "runs" / "a" / "calibration.safetensors")
    stats_b = RoutingStats.load(root / "runs" / "b" / "calibration.safetensors")
    assert stats_b.model_fingerprint == new_fp != stats_a.model_fingerprint
    assert not all(torch.equal(stats_a.gate_norm_sum[l], stats_b.gate_norm_sum[l]) for l in stats_a.layers)
    assert json.loads((root / "runs" / "b" / "plan.json").read_text())["model_fingerprint"] == new_fp
    esap = CliRunner().invoke(cli, ["esap", "--model", str(root / "model"), "--plan", str(root / "runs" / "b" / "plan.json"),
                                    "--data", str(root / "data.txt"), "--seq-len", "32", "--num-seqs", "6", "--json"])
    assert esap.exit_code == 0, esap.output
    assert json.loads(esap.output.strip().splitlines()[-1])["esap"] == pytest.approx(second["esap"], abs=1e-6)

    # The first run's study is never resumed on the new model: refused in one line.
    again = _run(root, "a")
    assert again.exit_code == 2 and again.output.count("error:") == 1, again.output
    assert "was searched with another model_fingerprint" in again.output and "new --name" in again.output
    # ... and the first run's plan is refused on the new model too.
    stale = CliRunner().invoke(cli, ["esap", "--model", str(root / "model"), "--plan", str(root / "runs" / "a" / "plan.json"),
                                     "--data", str(root / "data.txt"), "--seq-len", "32", "--num-seqs", "6"])
    assert stale.exit_code == 2 and "made for another model" in stale.output, stale.output
    assert first["model_fingerprint"] != second["model_fingerprint"]


def test_a_study_made_with_the_old_fingerprint_is_refused_with_a_message_that_says_so(tmp_path):
    root = make_root(tmp_path)
    _summary(_run(root, "old"))
    model, _ = load_model(root / "model")
    study = optuna.load_study(study_name="old", storage=f"sqlite:///{root / 'runs' / 'old'}.db")
    study.set_user_attr("model_fingerprint", legacy_fingerprint(model))     # as allocopt wrote it before
    result = _run(root, "old")
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "earlier model fingerprint (router weights only)" in result.output and "new --name" in result.output


def test_fingerprint_survives_save_and_reload_and_tracks_weights_and_dtype(tmp_path):
    model = build_tiny_model("olmoe", seed=5)
    _save(model, tmp_path / "a")
    loaded, _ = load_model(tmp_path / "a")
    fp = describe(loaded).fingerprint
    assert fp == describe(model).fingerprint                                # in memory = its saved checkpoint
    loaded.save_pretrained(tmp_path / "b", max_shard_size="200KB")          # the same weights, other shards
    assert describe(load_model(tmp_path / "b")[0]).fingerprint == fp
    assert describe(load_model(tmp_path / "a")[0]).fingerprint == fp        # and again (from the digest cache)

    # A bfloat16 copy scores plans differently: another model.
    assert describe(load_model(tmp_path / "a", dtype="bfloat16")[0]).fingerprint != fp
    # An expert changed in place after loading: hashed in memory, so the fingerprint follows, and it is the one
    # the changed model's own checkpoint has.
    with torch.no_grad():
        loaded.model.layers[2].mlp.experts.gate_up_proj[5, 0, 0] += 1.0
    changed = describe(loaded).fingerprint
    assert changed != fp
    _save(loaded, tmp_path / "c")
    assert describe(load_model(tmp_path / "c")[0]).fingerprint == changed
    # Any other tensor counts too (attention, not only routers and experts).
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert describe(model).fingerprint not in (fp, changed)


def test_the_digest_cache_is_used_on_the_second_load_and_invalidated_by_a_changed_file(tmp_path, cache_dir, monkeypatch):
    _save(build_tiny_model("qwen3_moe", seed=2), tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    reads: list[str] = []
    real = identity.file_digests
    monkeypatch.setattr(identity, "file_digests", lambda path: reads.append(path.name) or real(path))

    fp = describe(load_model(tmp_path / "m")[0]).fingerprint
    assert sorted(reads) == [s.name for s in shards]                        # each file read once
    [cache_file] = (cache_dir / "digests").glob("*.json")
    entries = json.loads(cache_file.read_text())["files"]
    assert sorted(entries) == [str(s.resolve()) for s in shards]
    st = shards[0].stat()
    assert entries[str(shards[0].resolve())]["key"][:2] == [st.st_size, st.st_mtime_ns]

    reads.clear()
    assert describe(load_model(tmp_path / "m")[0]).fingerprint == fp
    assert reads == []                                                      # warm: no weights file read again

    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))       # touched, same bytes: read again, same value
    assert describe(load_model(tmp_path / "m")[0]).fingerprint == fp
    assert reads == [shards[1].name]

    reads.clear()
    with open(shards[2], "r+b") as fh:                                      # one weight byte changed in place
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    assert describe(load_model(tmp_path / "m")[0]).fingerprint != fp
    assert reads == [shards[2].name]


def test_an_unwritable_cache_only_costs_a_read(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ALLOCOPT_CACHE_DIR", str(blocker / "cache"))
    _save(build_tiny_model("olmoe", seed=1), tmp_path / "m")
    a = describe(load_model(tmp_path / "m")[0]).fingerprint
    assert a == describe(load_model(tmp_path / "m")[0]).fingerprint


def test_the_digest_cache_keeps_the_checkpoints_used_last(tmp_path, cache_dir, monkeypatch):
    from safetensors.torch import save_file

    from allocopt import defaults

    monkeypatch.setattr(defaults, "DIGEST_CACHE_MAX_FILES", 2)
    for i in range(3):
        directory = (tmp_path / f"c{i}").resolve()
        directory.mkdir()
        save_file({"w": torch.full((4, 3), float(i)), "b": torch.arange(5)}, directory / "model.safetensors")
        digests = identity.checkpoint_digests(directory, [directory / "model.safetensors"])
        assert digests["b"][:2] == ("I64", (5,)) and digests["w"][:2] == ("F32", (4, 3))
        os.utime(identity._cache_path(directory), ns=(i * 10**9, i * 10**9))   # used in this order
    kept = {json.loads(f.read_text())["directory"] for f in (cache_dir / "digests").glob("*.json")}
    assert kept == {str((tmp_path / "c1").resolve()), str((tmp_path / "c2").resolve())}
