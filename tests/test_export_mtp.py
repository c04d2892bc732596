"""Multi-token-prediction layers (issue 23, item 4): a DeepSeek-V3 checkpoint with its MTP layer stored as published
(``model.layers.{num_hidden_layers}.*``: a whole MoE decoder layer plus enorm/hnorm/eh_proj/shared_head) exports a
checkpoint whose config no longer claims MTP layers it does not hold, with one warning line, and which loads."""
from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import MtpModel

from allocopt.export import save_pruned
from allocopt.export.mtp import mtp_weights_in
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


def test_an_mtp_layer_is_not_claimed_by_an_export_that_does_not_hold_it(tmp_path, caplog):
    """61 decoder layers as DeepSeek-V3 has (transformers skips ``model.layers.61.*`` on load by that index), the
    last three MoE."""
    source = tmp_path / "source"
    save_tiny_model(source, family="deepseek_v3", seed=2, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4, num_mtp_layers=1, num_hidden_layers=61, first_k_dense_replace=58)
    mtp_index = _with_mtp_layer(source)
    assert mtp_weights_in(source, mtp_index) == 1
    model, tokenizer = load_model(str(source), LoadOptions(device="cpu"))
    mtp = MtpModel.from_pretrained(model)                      # the fixture is what transformers' MTP loader reads
    assert torch.equal(mtp.layers[0].eh_proj.weight, load_file(source / "model.safetensors")[f"model.layers.{mtp_index}.eh_proj.weight"])

    kept = {60: list(range(0, 16, 2))}                         # 8 of 16 experts, 2 per group
    with caplog.at_level(logging.WARNING):
        save_pruned(model, tokenizer, tmp_path / "out", kept)
    warned = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(warned) == 1 and "num_mtp_layers = 0" in warned[0]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 0
    assert not [k for k in load_file(tmp_path / "out" / "model.safetensors") if f"layers.{mtp_index}." in k]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert plain.config.num_mtp_layers == 0
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_config_default_without_mtp_weights_is_set_to_none_without_a_warning(tmp_path, caplog):
    """transformers' DeepSeek-V3 config defaults to one MTP layer; a checkpoint without its weights exports 0 quietly."""
    save_tiny_model(tmp_path / "source", family="deepseek_v3", seed=2, num_mtp_layers=1)
    model, tokenizer = load_model(str(tmp_path / "source"), LoadOptions(device="cpu"))
    with caplog.at_level(logging.WARNING):
        save_pruned(model, tokenizer, tmp_path / "out", {2: [0, 2, 4, 6]})
    assert not [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
