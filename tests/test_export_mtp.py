"""Multi-token-prediction layers (issue 23, item 4): a DeepSeek-V3 checkpoint with its MTP layer stored as published
(``model.layers.{num_hidden_layers}.*``: a whole MoE decoder layer plus enorm/hnorm/eh_proj/shared_head) exports a
checkpoint that carries the MTP layer whole beside the pruned trunk, counted in its size, loadable by transformers'
MTP loader; a config that claims MTP layers the checkpoint does not hold exports 0."""
from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import MtpModel

from allocopt.export import save_pruned
from allocopt.export.mtp import mtp_weights_in
from allocopt.export.size import export_size
from allocopt.models import mask_experts
from allocopt.runtime.offload import tensor_bytes
from allocopt.runtime import load_model
from allocopt.runtime.loading import LoadOptions
from reliability_kit import save_tiny_model


def _with_mtp_layer(directory) -> int:
    """Add one MTP layer in DeepSeek-V3's published layout to a saved checkpoint; returns its layer index."""
    config = json.loads((directory / "config.json").read_text())
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    weights = load_file(directory / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    extra = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v + 0.01 * torch.randn(v.shape, generator=gen)
             for k, v in weights.items() if k.startswith(f"model.layers.{n - 1}.")}
    for name, shape in (("enorm.weight", [hidden]), ("hnorm.weight", [hidden]), ("eh_proj.weight", [hidden, 2 * hidden]),
                        ("shared_head.norm.weight", [hidden])):
        extra[f"model.layers.{n}.{name}"] = torch.randn(shape, generator=gen)
    extra[f"model.layers.{n}.shared_head.head.weight"] = weights["lm_head.weight"].clone()
    extra[f"model.layers.{n}.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file({**weights, **extra}, directory / "model.safetensors", metadata={"format": "pt"})
    return n


def test_an_mtp_layer_goes_whole_into_the_export_and_loads_beside_the_pruned_trunk(tmp_path):
    """61 decoder layers as DeepSeek-V3 has (transformers skips ``model.layers.61.*`` on load by that index), the
    last three MoE; the plan prunes the trunk, the MTP layer keeps its 16 experts, as stored."""
    source = tmp_path / "source"
    save_tiny_model(source, family="deepseek_v3", seed=2, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4, num_mtp_layers=1, num_hidden_layers=61, first_k_dense_replace=58)
    mtp_index = _with_mtp_layer(source)
    assert mtp_weights_in(source, mtp_index) == 1
    stored = {k: v for k, v in load_file(source / "model.safetensors").items() if f"layers.{mtp_index}." in k}
    model, tokenizer = load_model(str(source), LoadOptions(device="cpu"))
    mtp = MtpModel.from_pretrained(model)                      # the fixture is what transformers' MTP loader reads
    assert torch.equal(mtp.layers[0].eh_proj.weight, stored[f"model.layers.{mtp_index}.eh_proj.weight"])

    kept = {58: list(range(16)), 59: list(range(0, 16, 2)), 60: [0, 1, 4, 5, 8, 9, 12, 13]}   # 2 or 4 per group
    size = export_size(model)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with mask_experts(model, kept):
        scored = model(ids).logits
    save_pruned(model, tokenizer, tmp_path / "out", kept)
    out = tmp_path / "out"
    assert tensor_bytes(out) == size.bytes({l: len(k) for l, k in kept.items()})     # the MTP layer counted too
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 1 and saved["n_routed_experts"] == 16
    assert saved["layer_num_experts"][58:] == [16, 8, 8]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    copied = {k: v for f in {index[k] for k in stored} for k, v in load_file(out / f).items() if k in stored}
    assert copied.keys() == stored.keys() and all(torch.equal(copied[k], stored[k]) for k in stored)
    for loaded in (load_model(str(out))[0], AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        torch.testing.assert_close(loaded(ids).logits, scored, rtol=0, atol=1e-5)
        carried = MtpModel.from_pretrained(loaded)                 # transformers' MTP loader reads the export
        assert carried.layers[0].mtp_block.mlp.experts.gate_up_proj.shape[0] == 16     # the MTP layer keeps them all
        assert torch.equal(carried.layers[0].eh_proj.weight, stored[f"model.layers.{mtp_index}.eh_proj.weight"])


def test_a_config_default_without_mtp_weights_is_set_to_none_without_a_warning(tmp_path, caplog):
    """transformers' DeepSeek-V3 config defaults to one MTP layer; a checkpoint without its weights exports 0 quietly."""
    save_tiny_model(tmp_path / "source", family="deepseek_v3", seed=2, num_mtp_layers=1)
    model, tokenizer = load_model(str(tmp_path / "source"), LoadOptions(device="cpu"))
    with caplog.at_level(logging.WARNING):
        save_pruned(model, tokenizer, tmp_path / "out", {2: [0, 2, 4, 6]})
    assert not [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
