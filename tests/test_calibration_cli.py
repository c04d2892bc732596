"""`allocopt observe` end to end: a tiny saved checkpoint with its own tokenizer and a .txt calibration file."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from allocopt.calibration import RoutingStats, observe
from allocopt.cli.main import cli
from allocopt.data import load_tokens
from allocopt.models import describe
from allocopt.runtime import load_model
from reliability_kit import save_tiny_model

TEXT = " ".join(f"the expert number {i % 13} routes token {i % 7} to layer {i % 3} and back again" for i in range(200))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_model(root / "model", seed=5)
    (root / "calib.txt").write_text(TEXT, encoding="utf-8")
    return root


def test_observe_cli_writes_stats_matching_the_library(checkpoint, tmp_path):
    out = tmp_path / "stats.safetensors"
    args = ["observe", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "calib.txt"), "--out", str(out),
            "--seq-len", "32", "--num-seqs", "6", "--batch-size", "4", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "observed 192 tokens in 6 rows over 3 MoE layers" in result.output
    stats = RoutingStats.load(out)
    model, tokenizer = load_model(str(checkpoint / "model"))
    assert stats.model_fingerprint == describe(model).fingerprint
    tokens = load_tokens(str(checkpoint / "calib.txt"), tokenizer, 32, 6, split="calibration")
    assert stats.data_fingerprint == tokens.fingerprint()
    again = observe(model, tokens, batch_size=3, progress=False)
    for layer in stats.layers:
        assert torch.equal(stats.count[layer], again.count[layer])
        torch.testing.assert_close(stats.gate_norm_sum[layer], again.gate_norm_sum[layer], rtol=1e-5, atol=1e-6)


def test_observe_cli_reports_user_errors_on_one_line(checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["observe", "--model", str(checkpoint / "model"), "--data", str(tmp_path / "none.txt"),
                                      "--seq-len", "32", "--out", str(tmp_path / "s.safetensors")])   # fits the 128-token context
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: data spec") and "none.txt" in last
    assert "Traceback" not in result.output


@pytest.mark.parametrize("flag, value, rule", [("--similarity-tokens", "-5", "x>=0"), ("--num-seqs", "0", "x>=1"),
                                               ("--batch-size", "0", "x>=1"), ("--seq-len", "1", "x>=2")])
def test_observe_refuses_sizes_below_their_range_before_loading(checkpoint, tmp_path, flag, value, rule):
    out = tmp_path / "stats.safetensors"
    result = CliRunner().invoke(cli, ["observe", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "calib.txt"),
                                      "--out", str(out), flag, value, "--no-progress"])
    assert result.exit_code == 2 and f"{value} is not in the range {rule}" in result.output, result.output
    assert not out.exists()
