"""Pruned exports of block-FP8 checkpoints keep the source's format (issue 21, finding 9).

A block-FP8 checkpoint as DeepSeek-V3 and Qwen3-FP8 publish it (per-expert ``weight`` in float8_e4m3fn with a
``weight_scale_inv`` per block, ``quantization_config.quant_method == "fp8"``) loads dequantized on a CPU; its
pruned export was written dense without the quantization_config, about twice the size, with no note. Now the
quantized tensors of the kept experts are copied as stored, and the export dequantizes to the weights that were
scored."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from allocopt.cli.main import cli
from allocopt.models import describe, prune_model
from allocopt.plan import Plan
from allocopt.runtime import load_model
from reliability_kit import save_tiny_model

BLOCK = 16


def save_block_fp8(directory, family: str) -> None:
    """A tiny bf16 model saved by ``save_pretrained``, then every 2-D projection (experts, attention, shared expert;
    not routers, embeddings or head) stored as float8_e4m3fn with a float32 ``weight_scale_inv`` per 16x16 block,
    the layout and config of DeepSeek-V3's FP8 release."""
    save_tiny_model(directory, family=family, seed=3)
    sd = load_file(directory / "model.safetensors")
    out = {}
    for name, value in sd.items():
        rows, cols = value.shape if value.dim() == 2 else (1, 1)
        if not name.endswith("proj.weight") or value.dim() != 2 or rows % BLOCK or cols % BLOCK:
            out[name] = value.to(torch.bfloat16) if value.is_floating_point() else value
            continue
        blocks = value.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
        scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
        out[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(dtype="bfloat16", quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                          "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def _tensors(directory) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: (fh.get_slice(k).get_dtype(), fh.get_tensor(k)) for k in fh.keys()})
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_a_pruned_block_fp8_checkpoint_stays_fp8_and_dequantizes_to_what_was_scored(family, tmp_path, caplog):
    save_block_fp8(tmp_path / "model", family)
    source, _ = load_model(tmp_path / "model", device="cpu")              # dequantized on a CPU, as transformers does
    info = describe(source)
    groups = getattr(source.config, "n_group", None) or 1          # group-limited routing keeps as many per group
    kept = {}
    for l, n in info.num_experts.items():
        size = n // groups
        pick = torch.randperm(size, generator=torch.Generator().manual_seed(l))[: size // 2 + l % 2].tolist()
        kept[l] = sorted(g * size + i for g in range(groups) for i in pick)
    plan = Plan.from_counts(info.fingerprint, kept, info.num_experts, {l: len(k) for l, k in kept.items()},
                            model=str(tmp_path / "model"))
    plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(cli, ["prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output

    limited = CliRunner().invoke(cli, ["prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "streamed"),
                                       "--max-memory", "cpu=150KB", "--offload-dir", str(tmp_path / "off")])
    assert limited.exit_code == 0, limited.output                 # offloaded, written a layer at a time: the same files
    streamed, stored, written = (_tensors(tmp_path / d) for d in ("streamed", "model", "out"))
    assert streamed.keys() == written.keys()
    assert all(torch.equal(t.view(torch.uint8), written[k][1].view(torch.uint8)) for k, (_, t) in streamed.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    layer = min(kept)
    expert = next(k for k in written if f"layers.{layer}." in k and ".experts.1." in k and k.endswith("_scale_inv"))
    original = expert.replace(".experts.1.", f".experts.{kept[layer][1]}.")     # renumbered: kept experts in order
    assert written[expert][0] == "F32" and torch.equal(written[expert][1], stored[original][1])
    weight = expert.removesuffix("_scale_inv")
    assert written[weight][0] == "F8_E4M3"
    assert torch.equal(written[weight][1].view(torch.uint8), stored[original.removesuffix("_scale_inv")][1].view(torch.uint8))
    quantized = [k for k, (dtype, _) in written.items() if dtype == "F8_E4M3"]
    assert all(k + "_scale_inv" in written for k in quantized) and any("self_attn" in k for k in quantized)
    assert not any(dtype == "F32" and not k.endswith("_scale_inv") for k, (dtype, _) in written.items())

    dense = sum(t.numel() * 2 for k, (_, t) in written.items() if not k.endswith("_scale_inv"))    # as bf16
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert on_disk < 0.75 * dense

    pruned, _ = load_model(tmp_path / "out", device="cpu")          # allocopt's loader, its experts kernel
    assert describe(pruned).num_experts == {l: len(k) for l, k in kept.items()}
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    c = plain.state_dict()                         # plain transformers with the export's own code: the same weights
    reference = prune_model(source, kept)          # the scored (dequantized) model, pruned in memory
    a, b = reference.state_dict(), pruned.state_dict()
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                          # in float32, so that only the summation order can differ
        diff = (pruned.float()(ids, use_cache=False).logits - reference.float()(ids, use_cache=False).logits).abs().max()
    assert diff.item() <= 1e-5


def test_a_quantized_format_that_cannot_be_copied_is_exported_dequantized_and_said(tmp_path, caplog):
    """A padded export writes new experts, so it cannot copy the source's FP8 tensors: it is written dense and the
    log says so in one line, instead of silently changing the format."""
    save_block_fp8(tmp_path / "model", "deepseek_v3")             # a router bias: padding can be exact
    source, _ = load_model(tmp_path / "model", device="cpu")
    info = describe(source)
    kept = {l: [0, 1, 4, 5] if l % 2 else [0, 1, 2, 4, 5, 6] for l in info.num_experts}   # 2 groups of 4
    plan = Plan.from_counts(info.fingerprint, kept, info.num_experts, {l: len(k) for l, k in kept.items()},
                            model=str(tmp_path / "model"))
    plan.save(tmp_path / "plan.json")
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(cli, ["prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"),
                                          "--pad"])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "dequantized" in r.getMessage()]
    assert len(said) == 1 and "quant_method 'fp8'" in said[0] and "--pad" in said[0], said
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
