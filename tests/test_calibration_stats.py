"""RoutingStats file format: lossless round trip, and clear errors for anything that is not our file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from allocopt.calibration import ACCUMULATORS, RoutingStats, observe
from allocopt.criteria import available_criteria, rank
from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.models import describe
from allocopt.testing.tiny import build_tiny_model

CRITERIA = [c for c in available_criteria() if c != "unified"] + [
    f"unified:b={b},alpha={a},beta={c}" for b in (0, 1) for a, c in ((0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (2, 2))]


@pytest.fixture(scope="module")
def observed() -> RoutingStats:
    model = build_tiny_model("mixtral", seed=1)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    stats = observe(model, TokenSet(ids, mask, mask.bool(), "t"), batch_size=2, progress=False)
    assert stats.model_fingerprint == describe(model).fingerprint
    return stats


def test_round_trip_is_identical(observed, tmp_path):
    path = observed.save(tmp_path / "stats.safetensors")
    back = RoutingStats.load(path)
    assert (back.model_fingerprint, back.data_fingerprint, back.num_tokens, back.layers) == (
        observed.model_fingerprint, observed.data_fingerprint, observed.num_tokens, observed.layers)
    for name in (*ACCUMULATORS, "similarity"):
        for layer in observed.layers:
            a, b = getattr(observed, name)[layer], getattr(back, name)[layer]
            assert a.dtype == b.dtype and torch.equal(a, b), (name, layer)
    assert observed.count[observed.layers[0]].dtype == torch.float64
    assert observed.similarity[observed.layers[0]].dtype == torch.float32
    for crit in CRITERIA:
        assert rank(back, crit) == rank(observed, crit), crit


def test_header_carries_metadata(observed, tmp_path):
    path = observed.save(tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["allocopt"])
        keys = set(fh.keys())
    assert meta["format"] == "allocopt.stats/1"
    assert meta["layers"] == observed.layers and meta["num_tokens"] == observed.num_tokens
    assert set(meta["accumulators"]) == set(ACCUMULATORS)
    assert f"layer.{observed.layers[0]}.count" in keys
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary behind


def test_missing_file(tmp_path):
    with pytest.raises(AllocoptError, match="does not exist"):
        RoutingStats.load(tmp_path / "nope.safetensors")


def test_corrupt_file(observed, tmp_path):
    path = observed.save(tmp_path / "s.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(AllocoptError, match="not a readable safetensors"):
        RoutingStats.load(path)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(AllocoptError):
        RoutingStats.load(garbage)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(AllocoptError, match="not an allocopt statistics file"):
        RoutingStats.load(path)


def test_format_mismatch_and_missing_tensor(observed, tmp_path):
    tensors = observed._tensors()
    meta = {"format": "allocopt.stats/0", "model_fingerprint": "m", "data_fingerprint": "d", "num_tokens": 1,
            "layers": observed.layers}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"allocopt": json.dumps(meta)})
    with pytest.raises(AllocoptError, match="expected 'allocopt.stats/1'"):
        RoutingStats.load(old)
    meta["format"] = "allocopt.stats/1"
    del tensors[f"layer.{observed.layers[-1]}.max_act"]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), metadata={"allocopt": json.dumps(meta)})
    with pytest.raises(AllocoptError, match="lacks tensor"):
        RoutingStats.load(partial)


def test_non_finite_statistics_are_never_saved_or_loaded(observed, tmp_path):
    """What an overflowed float16 pass used to write (NaN gate sums) is refused on both sides of the file."""
    layer = observed.layers[1]
    broken = RoutingStats.load(observed.save(tmp_path / "ok.safetensors"))
    broken.gate_sum[layer][3] = float("nan")
    broken.norm_sum[layer][0] = float("inf")
    with pytest.raises(AllocoptError, match=rf"non-finite values \(inf/NaN\) in layer\.{layer}\.gate_sum and 1 more.*bfloat16"):
        broken.save(tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists() and not list(tmp_path.glob(".*tmp"))

    meta = {"format": "allocopt.stats/1", "model_fingerprint": "m", "data_fingerprint": "d", "num_tokens": 1,
            "layers": observed.layers}
    written = tmp_path / "written_elsewhere.safetensors"
    save_file(broken._tensors(), str(written), metadata={"allocopt": json.dumps(meta)})
    with pytest.raises(AllocoptError, match=rf"statistics file {written}: non-finite values .* layer\.{layer}\.gate_sum"):
        RoutingStats.load(written)
