"""Security (issue 7.4): nothing a user is handed runs code unless they ask for it.

* weights load from safetensors only: a checkpoint with only a pickle (pytorch_model.bin) is refused and
  never unpickled; a statistics file that is a pickle is refused (or, as a run's cache, replaced) unread;
* ``trust_remote_code`` is False unless ``--trust-remote-code`` is passed, and a config whose ``auto_map``
  names the checkpoint's own code is refused without it;
* problem files are TOML data: code in their strings is never executed.

Every payload here really runs when given to pickle / imported, which the tests check first, so "the marker
file does not exist" means allocopt did not run it.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

from allocopt.calibration import RoutingStats
from allocopt.cli.main import cli
from allocopt.errors import AllocoptError
from reliability_kit import ENV, SMALL, make_root, remote_code_copy, run_args

FAST = ["--evals", "4", "--population", "4"]


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for an attacker's code in a pickle file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    probe = marker.with_name(marker.name + ".probe")
    pickle.loads(pickle.dumps(_Payload(probe))).close()        # the payload is live ...
    assert probe.exists()
    probe.unlink()
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("security"))


def _one_error_line(result) -> str:
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---- safetensors only -------------------------------------------------------------------------------------

def test_a_pickle_only_checkpoint_is_refused_and_never_unpickled(root, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_bytes((root / "model" / name).read_bytes())
    marker = tmp_path / "unpickled"
    _malicious_pickle(ckpt / "pytorch_model.bin", marker)

    for args in (["info", "--model", str(ckpt)],
                 ["run", "--model", str(ckpt), "--data", str(root / "data.txt"), *SMALL, "--out", str(tmp_path / "o")]):
        message = _one_error_line(CliRunner().invoke(cli, args))
        assert "only pickle weights (pytorch_model.bin)" in message and "safetensors only" in message
    assert not marker.exists()


def test_a_statistics_pickle_is_refused_and_a_pickled_run_cache_is_replaced_unread(root, tmp_path):
    marker = tmp_path / "unpickled"
    stats = _malicious_pickle(tmp_path / "stats.safetensors", marker)
    with pytest.raises(AllocoptError, match="not a readable safetensors file"):
        RoutingStats.load(stats)

    run_dir = root / "runs" / "poisoned"                 # a run whose cached statistics someone swapped for a pickle
    run_dir.mkdir(parents=True)
    _malicious_pickle(run_dir / "calibration.safetensors", marker)
    result = CliRunner().invoke(cli, run_args(root, "poisoned", *FAST))
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert RoutingStats.load(run_dir / "calibration.safetensors").num_tokens > 0     # observed afresh, safetensors


# ---- trust_remote_code --------------------------------------------------------------------------------------

def test_trust_remote_code_reaches_from_pretrained_only_when_asked(root, monkeypatch):
    seen: list[tuple[str, object]] = []
    for auto in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto.from_pretrained

        def spy(*args, _original=original, _name=auto.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    (root / "empty.txt").write_text("")                  # stops each run right after the model loaded

    def flags(*args: str) -> set[object]:
        seen.clear()
        result = CliRunner().invoke(cli, list(args))
        assert result.exit_code == 2 and "is empty" in result.stderr, result.output
        # AutoConfig too where the config needs transformers' reader (remote code); a stock type's config is built
        # from the config.json allocopt read
        assert {"AutoModelForCausalLM", "AutoTokenizer"} <= {name for name, _ in seen}, seen
        return {flag for _, flag in seen}

    base = ["run", "--model", str(root / "model"), "--data", str(root / "empty.txt"), *SMALL, "--out", str(root / "runs" / "t")]
    assert flags(*base) == {False}
    assert flags(*base, "--trust-remote-code") == {True}
    assert flags("observe", "--model", str(root / "model"), "--data", str(root / "empty.txt"), "--seq-len", "24", "--out",
                 str(root / "s.safetensors")) == {False}


@pytest.fixture(scope="module")
def remote(root, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny OLMoE re-labelled as model_type "marker_moe", whose classes live in the checkpoint's own
    remote_code.py; importing that file writes the marker."""
    return remote_code_copy(root / "model", tmp_path_factory.mktemp("remote") / "model")


def test_remote_code_is_refused_without_the_flag(root, remote, tmp_path):
    ckpt, marker = remote
    for args in (["info", "--model", str(ckpt)],
                 ["run", "--model", str(ckpt), "--data", str(root / "data.txt"), *SMALL, "--out", str(tmp_path / "o")],
                 ["observe", "--model", str(ckpt), "--data", str(root / "data.txt"), "--out", str(tmp_path / "s.safetensors")]):
        message = _one_error_line(CliRunner().invoke(cli, args))
        assert "needs its own Python code (auto_map in config.json" in message and "--trust-remote-code" in message
    assert not marker.exists()
    assert not (tmp_path / "o").exists()                    # refused before anything was created


def test_remote_code_runs_when_the_user_passes_the_flag(root, remote, tmp_path):
    ckpt, marker = remote
    args = ["run", "--model", str(ckpt), "--data", str(root / "data.txt"), *SMALL, *FAST, "--out", str(tmp_path / "o"),
            "--name", "remote", "--trust-remote-code"]
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules")}
    out = subprocess.run([sys.executable, "-m", "allocopt.cli.main", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "imported"
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["model"] == str(ckpt)


# ---- problem files are data ------------------------------------------------------------------------------------

def test_problem_file_strings_are_never_executed(tmp_path):
    marker = tmp_path / "executed"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    problem = tmp_path / "evil.toml"
    problem.write_text(f'model = "{tmp_path}/no-such-model"\ncriterion = "reap"\nrun_name = "evil"\n'
                       f'out = "{tmp_path}/o"\n[options]\nhook = "{code}"\n', encoding="utf-8")
    for key in ("criterion", "objective", "optimizer"):
        payload = tmp_path / f"{key}.toml"
        payload.write_text(f'{key} = "{code}"\n', encoding="utf-8")
        message = _one_error_line(CliRunner().invoke(cli, ["run", "--problem", str(payload)]))
        assert f"unknown {key}" in message and "__import__" in message          # the string is just a name
    message = _one_error_line(CliRunner().invoke(cli, ["run", "--problem", str(problem)]))
    assert "does not exist" in message
    exec_in_toml = tmp_path / "syntax.toml"
    exec_in_toml.write_text(f"sparsity = {code}\n", encoding="utf-8")          # not TOML at all
    assert "not valid TOML" in _one_error_line(CliRunner().invoke(cli, ["run", "--problem", str(exec_in_toml)]))
    assert not marker.exists()
