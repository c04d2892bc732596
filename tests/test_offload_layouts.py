"""Offloaded loads from checkpoints as they are published (issue 21, finding 1).

``save_pretrained`` and the model hubs store one tensor per expert for most families; transformers fuses them at load
time. Under disk offload that conversion ran on whole fused tensors (3.3 GB of RSS for a 600 MiB limit on a 2-layer
OLMoE-1B-7B); allocopt now runs transformers' own conversion a slice of experts at a time ahead of the load
(``runtime.converted``). These tests hold the result to transformers' whole-tensor conversion, bit for bit, on the
per-expert layouts of several families and on the fused layout, and check that no conversion step holds more experts
than the slice allows."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from allocopt.calibration import observe
from allocopt.data import load_tokens
from allocopt.models import describe
from allocopt.runtime import load_model
from allocopt.runtime import converted as conv
from allocopt.runtime.loading import LoadOptions
from reliability_kit import TEXT, save_tiny_model


def _options(directory, root) -> LoadOptions:
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return LoadOptions(max_memory={"cpu": f"{max(1, int(total * 0.3) // 1024)}KB"}, offload_dir=str(root / "offload"))


def _stored_names(directory) -> set[str]:
    return set(conv.checkpoint_tensors(directory))


# olmoe/qwen2_moe (shared expert)/deepseek_v3 (groups): gate/up/down per expert; mixtral: w1/w2/w3 under
# block_sparse_moe, renamed and fused; gpt_oss: fused on disk already (nothing to convert)
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss"])
def test_slice_by_slice_conversion_equals_transformers_whole_tensor_load(family, tmp_path):
    save_tiny_model(tmp_path / "model", family=family, seed=5)
    plain, _ = load_model(tmp_path / "model", device="cpu")
    names = _stored_names(tmp_path / "model")
    per_expert = any(".experts.0." in n for n in names)
    assert per_expert == (family != "gpt_oss")                  # save_pretrained writes what the hubs publish

    calls = []
    original = conv._Target.convert

    def spy(self, start, stop, read, skeleton):
        calls.append((self.name, start, stop))
        return original(self, start, stop, read, skeleton)

    conv._Target.convert = spy
    try:
        made = conv.converted_checkpoint(tmp_path / "model", _meta(plain), tmp_path / "offload", slice_bytes=1)
    finally:
        conv._Target.convert = original
    if not per_expert:
        assert made.path == tmp_path / "model" and made.transforms is None and not calls
        return
    assert made.path == tmp_path / "offload" / conv.VIEW_DIR
    assert calls and all(stop - start == 1 for _, start, stop in calls)   # one expert per conversion step
    stored = {k: v for f in made.path.glob("*.safetensors") for k, v in load_file(f).items()}
    state = plain.state_dict()
    assert len(stored) == len(conv.checkpoint_tensors(made.path))
    experts = [n for n in stored if ".experts." in n]
    assert experts and all(n in state for n in experts) and all(".experts.0." not in n for n in stored)
    for name, value in stored.items():     # converted or copied, bit for bit (renamed ones are renamed at load)
        if name in state:
            assert torch.equal(value.to(state[name].dtype), state[name]), name


def _meta(model):
    from allocopt.runtime.loading import _skeleton

    return _skeleton(model.config)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_an_offloaded_model_from_either_layout_streams_experts_and_equals_the_plain_model(layout, tmp_path):
    """Both layouts load under a limit with the experts offloaded to safetensors files the slice reader can use
    (``expert_slices.sliceable``), give the plain model's logits and statistics, and save back the published names."""
    from allocopt.models import find_moe_blocks
    from allocopt.runtime.expert_slices import sliceable

    save_tiny_model(tmp_path / "model", family="olmoe", seed=5)
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    plain, tokenizer = load_model(tmp_path / "model", device="cpu")
    if layout == "fused":                               # transformers' in-memory names, as some exporters write them
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "model" / "model.safetensors"),
                  metadata={"format": "pt"})
        plain, tokenizer = load_model(tmp_path / "model", device="cpu")     # identity follows the files' tensors
    dispatched, _ = load_model(tmp_path / "model", _options(tmp_path / "model", tmp_path))
    assert "disk" in set(dispatched.hf_device_map.values())
    assert any(sliceable(b) for b in find_moe_blocks(dispatched))
    assert describe(dispatched).fingerprint == describe(plain).fingerprint
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (plain(ids, use_cache=False).logits - dispatched(ids, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-5
    tokens = load_tokens(str(tmp_path / "data.txt"), tokenizer, 16, 4, split="calibration")
    a, b = observe(plain, tokens, progress=False), observe(dispatched, tokens, progress=False, slice_bytes=1)
    for layer in a.layers:
        assert torch.allclose(a.gate_norm_sum[layer], b.gate_norm_sum[layer], rtol=1e-5, atol=1e-7)
    assert dispatched.config._name_or_path == str(tmp_path / "model")      # the source, not the converted copy


def test_the_converted_copy_is_made_once_and_again_when_the_checkpoint_changes(tmp_path):
    save_tiny_model(tmp_path / "model", family="olmoe", seed=5)
    plain, _ = load_model(tmp_path / "model", device="cpu")
    first = conv.converted_checkpoint(tmp_path / "model", _meta(plain), tmp_path / "off")
    stamp = (first.path / conv.STAMP_FILE).stat().st_mtime_ns
    again = conv.converted_checkpoint(tmp_path / "model", _meta(plain), tmp_path / "off")
    assert (again.path / conv.STAMP_FILE).stat().st_mtime_ns == stamp                  # reused
    state = load_file(tmp_path / "model" / "model.safetensors")
    key = next(k for k in state if k.endswith("experts.0.down_proj.weight"))
    state[key] = state[key] + 1                                                       # a fine-tune of one expert
    save_file(state, str(tmp_path / "model" / "model.safetensors"), metadata={"format": "pt"})
    remade = conv.converted_checkpoint(tmp_path / "model", _meta(plain), tmp_path / "off")
    fused = load_file(next(remade.path.glob(f"{key.split('.experts.')[0]}.experts.down_proj.safetensors")))
    assert torch.equal(next(iter(fused.values()))[0], state[key])
    assert json.loads((remade.path / conv.STAMP_FILE).read_text())["files"] != []
