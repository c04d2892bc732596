"""The self-contained export (its own modelling code, loaded where allocopt is not importable) and the exact padded
export (stock transformers, no remote code, logits equal to the masked model's; refused where it cannot be exact)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

from allocopt.cli.main import cli
from allocopt.errors import AllocoptError
from allocopt.models import describe, find_moe_blocks, load_pruned, mask_experts
from allocopt.runtime import load_model
from allocopt.export import save_pruned
from allocopt.plan import Plan
from allocopt.export.padded import pad_model
from allocopt.export.remote_code import MODELING_FILE
from conftest import FAMILIES, random_kept

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

# Run in a fresh interpreter with allocopt made unimportable (a None entry in sys.modules makes `import` fail, also
# through an editable install's finder) and no source checkout on sys.path (an entry holding an `allocopt/` package
# folder): plain transformers + the checkpoint's own code, as on a machine without allocopt. Only the checkouts are
# dropped, so a venv created inside the checkout (.venv/lib/.../site-packages) keeps torch and transformers.
_LOAD_WITHOUT_ALLOCOPT = """
import os, sys
sys.modules["allocopt"] = None
sys.path = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.getcwd(), "allocopt", "__init__.py"))]
import json, torch, transformers
for directory, ids, out in json.loads(sys.argv[1]):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model.eval()(torch.tensor(ids)).logits, out)
    print(type(model).__module__.split(".")[0], type(model).__name__)
try:
    import allocopt
    print("allocopt importable")
except ImportError:
    print("allocopt not importable")
"""


def _plan(model, counts=(3, 6, 4), seed=0) -> Plan:
    info = describe(model)
    kept = random_kept(info, counts, seed)
    return Plan.from_counts(info.fingerprint, kept, info.num_experts, {l: len(k) for l, k in kept.items()})


def _load_without_allocopt(jobs: list[tuple[Path, list, Path]], cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_ALLOCOPT, json.dumps([[str(d), i, str(o)] for d, i, o in jobs])],
                          capture_output=True, text=True, cwd=cwd, timeout=600, env={"PATH": "/usr/bin:/bin",
                                                                                       "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_self_contained_export_loads_with_plain_transformers_without_allocopt(tiny_model, tmp_path):
    """Every component family and the non-uniform testbed: trust_remote_code logits equal load_pruned's (fp32)."""
    jobs, expected = [], {}
    for family in FAMILIES:
        model = tiny_model(family, seed=2)
        out = tmp_path / family
        save_pruned(model, None, out, _plan(model, (3, 6, 4) if describe(model).layers[0].groups == 1 else (4, 6, 2)))
        jobs.append((out, IDS.tolist(), tmp_path / f"{family}.pt"))
        with torch.no_grad():
            expected[family] = load_pruned(out)(IDS).logits
    testbed, tokenizer = load_model("testbed")
    info = describe(testbed)
    kept = {l.index: list(range(c)) for l, c in zip(info.layers, (12, 6, 8, 4, 10, 8))}
    save_pruned(testbed, tokenizer, tmp_path / "testbed", kept)
    ids = tokenizer("x = 3\ny = 41 + x\n", add_special_tokens=False)["input_ids"]
    jobs.append((tmp_path / "testbed", [ids], tmp_path / "testbed.pt"))
    with torch.no_grad():
        expected["testbed"] = load_pruned(tmp_path / "testbed")(torch.tensor([ids])).logits

    lines = _load_without_allocopt(jobs, tmp_path)
    assert lines[-1] == "allocopt not importable"
    assert all(line.startswith("transformers_modules Allocopt") for line in lines[:-1]), lines
    diffs = {name: (torch.load(tmp_path / f"{name}.pt") - want).abs().max().item() for name, want in expected.items()}
    print("\nself-contained export, plain transformers without allocopt vs load_pruned, max |logit diff|: "
          + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    config = json.loads((tmp_path / "testbed" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_allocopt.AllocoptOlmoeForCausalLM"}
    assert config["architectures"] == ["OlmoeForCausalLM"] and config["model_type"] == "olmoe"
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):            # what the modelling code is for
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "testbed")


def test_uniform_export_needs_no_modelling_code(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe", seed=1)
    save_pruned(model, None, tmp_path / "out", _plan(model, (4, 4, 4)))
    assert not (tmp_path / "out" / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, load_pruned(tmp_path / "out")(IDS).logits)


# (8, 4): one layer keeps all 8 experts, so the padded width is the unpruned one (the export must still pad the other).
@pytest.mark.parametrize("family, counts", [("gpt_oss", (3, 6, 4)), ("deepseek_v3", (4, 6, 2)), ("glm4_moe", (2, 6, 4)),
                                            ("deepseek_v3", (8, 4))])
def test_padded_export_equals_masked_model_in_plain_transformers(tiny_model, tmp_path, family, counts):
    model = tiny_model(family, seed=3)
    plan = _plan(model, counts, seed=1)
    with torch.no_grad(), mask_experts(model, plan.kept):
        masked = model(IDS).logits
    result = CliRunner().invoke(cli, ["prune", "--plan", str(_save(plan, tmp_path)), "--model", str(_saved(model, tmp_path)),
                                      "--out", str(tmp_path / "padded"), "--pad", "--quiet"])
    assert result.exit_code == 0, result.output
    width = max(len(k) for k in plan.kept.values())
    assert f"padded to {width} experts per layer" in result.output
    config = json.loads((tmp_path / "padded" / "config.json").read_text())
    assert "layer_num_experts" not in config and "auto_map" not in config
    assert not (tmp_path / "padded" / MODELING_FILE).exists()
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "padded", dtype=torch.float32)
    assert type(stock) is getattr(transformers, type(model).__name__)
    assert describe(stock).num_experts == {l: width for l in plan.kept}
    with torch.no_grad():
        padded = stock(IDS).logits
    print(f"\n--pad {family}: stock {type(stock).__name__}, {width} experts per layer, max |logit diff| vs masked "
          f"{(padded - masked).abs().max().item():.1e}")
    assert (padded - masked).abs().max().item() <= 1e-5
    # The -inf bias is what makes it exact: with the padded experts' bias at 0 they are chosen and outputs change.
    for block in find_moe_blocks(stock):
        bias = next(t for t in (*block.selection_biases(), getattr(block.router, "bias", None)) if t is not None)
        bias.data[torch.isinf(bias.data)] = 0.0
    with torch.no_grad():
        assert (stock(IDS).logits - masked).abs().max().item() > 1e-3


def test_padding_keeps_group_limited_routing_balanced(tiny_model):
    model = tiny_model("deepseek_v3", seed=4, n_group=2, topk_group=1)
    kept = {1: [0, 1, 4, 5], 2: [0, 1, 2, 4, 5, 6]}            # 2+2 and 3+3 per group
    with torch.no_grad(), mask_experts(model, kept):
        masked = model(IDS).logits
    pad_model(model, kept)
    block = {b.layer: b for b in find_moe_blocks(model)}[1]
    bias = block.choice_bias()
    # Layer 1 is padded in place inside each group: [kept, kept, pad] twice, the pads at -inf.
    assert torch.isinf(bias).tolist() == [False, False, True, False, False, True]
    with torch.no_grad():
        assert (model(IDS).logits - masked).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "ernie4_5_moe"])
def test_pad_refused_in_one_line_where_it_cannot_be_exact(tiny_model, tmp_path, family):
    model = tiny_model(family, seed=0)
    plan = _plan(model)
    result = CliRunner().invoke(cli, ["prune", "--plan", str(_save(plan, tmp_path)), "--model", str(_saved(model, tmp_path)),
                                      "--out", str(tmp_path / "padded"), "--pad"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    print("\n" + line)
    reason = "after a softmax" if family == "ernie4_5_moe" else "no per-expert router bias"
    assert line.startswith(f"error: --pad cannot be exact here: {family} (") and reason in line and "without --pad" in line
    assert not (tmp_path / "padded").exists()


def test_padded_experts_are_zero_and_memory_is_reported(tiny_model, tmp_path):
    model = tiny_model("gpt_oss", seed=5)
    plan = _plan(model, (2, 6, 4))
    bytes_per_expert = describe(model).layers[0].bytes_per_expert
    result = CliRunner().invoke(cli, ["prune", "--plan", str(_save(plan, tmp_path)), "--model", str(_saved(model, tmp_path)),
                                      "--out", str(tmp_path / "padded"), "--pad", "--quiet"])
    assert result.exit_code == 0, result.output
    compact, padded = 12 * bytes_per_expert, 18 * bytes_per_expert
    assert f"{padded / 2**20:.2f} MiB, {padded / compact:.2f}x the compact export's {compact / 2**20:.2f} MiB" in result.output
    assert "1.50x" in (tmp_path / "padded" / "README.md").read_text()
    weights = load_file(next((tmp_path / "padded").glob("*.safetensors")))
    bias = weights["model.layers.0.mlp.router.bias"]
    pads = torch.isinf(bias).nonzero().flatten()
    assert len(pads) == 4 and (bias[pads] < 0).all()
    assert weights["model.layers.0.mlp.experts.gate_up_proj"][pads].abs().sum() == 0


def test_pad_model_rejects_a_bad_plan(tiny_model):
    model = tiny_model("gpt_oss", seed=0)
    with pytest.raises(AllocoptError, match="fewer than its top-k"):
        pad_model(model, {0: [1]})
    assert describe(model).num_experts == {0: 8, 1: 8, 2: 8}


def _saved(model, tmp_path: Path) -> Path:
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _save(plan: Plan, tmp_path: Path) -> Path:
    plan.save(tmp_path / "plan.json")
    return tmp_path / "plan.json"


def test_vllm_plugin_table_covers_families_with_a_count_field():
    """Every architecture the plugin registers is a transformers class of a family row whose count field it sets."""
    from allocopt.models.families import family_for
    from allocopt.serving.vllm_plugin import VLLM_ARCHITECTURES, version_supported

    for arch in VLLM_ARCHITECTURES:
        family = family_for(getattr(transformers, arch).config_class.model_type)
        assert family.count_field and "." not in family.count_field and not family.unsupported, arch
    assert version_supported("0.32.0+cpu") and version_supported("0.32.1")
    assert not version_supported("0.31.2") and not version_supported("0.33.0")
