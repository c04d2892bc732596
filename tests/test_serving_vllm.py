"""vLLM (CPU build, `.venv-vllm`) serves allocopt exports: the compact non-uniform export through allocopt's plugin,
the padded export with no plugin at all, and `allocopt eval --backend vllm` agrees with the transformers path.

Every vLLM start costs ~20-80 s on 2 cores, so each test batches all its prompts into one start."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.evaluation import tasks
from allocopt.models import describe, load_pruned, mask_experts
from allocopt.runtime.loading import load_model
from allocopt.plan import Plan
from allocopt.serving.vllm_engine import run_in
from conftest import random_kept
from vllm_kit import ENV, greedy_reference, logprobs_along, tiny_vllm_model, vllm_python

pytestmark = pytest.mark.slow
PROMPTS_PER_DOMAIN = 12       # 24 held-out prompts: math worksheets and code files the testbed never trained on
NEW_TOKENS = 16
TOP = 5


@pytest.fixture(scope="module")
def python():
    return vllm_python()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A non-uniform plan found by `allocopt run` on the testbed, and its compact export (`allocopt prune`)."""
    root = tmp_path_factory.mktemp("serve")
    run = CliRunner().invoke(cli, ["run", "--optimizer", "ga", "--criterion", "reap", "--sparsity", "0.5",
                                   "--seq-len", "64", "--num-seqs", "4", "--calib-num-seqs", "8", "--evals", "24",
                                   "--population", "8", "--out", str(root / "run"), "--name", "serve", "--quiet"])
    assert run.exit_code == 0, run.output
    plan = Plan.load(root / "run" / "plan.json")
    assert len(set(plan.counts)) > 1, f"the search returned a uniform plan {plan.counts}"
    prune = CliRunner().invoke(cli, ["prune", "--plan", str(root / "run" / "plan.json"), "--out", str(root / "export"),
                                     "--quiet"])
    assert prune.exit_code == 0, prune.output
    return root, plan


def _heldout_prompts(tokenizer) -> list[list[int]]:
    texts = [i["prompt"] for i in tasks.math_items()[:PROMPTS_PER_DOMAIN]] + \
            [i["prompt"] for i in tasks.code_items()[:PROMPTS_PER_DOMAIN]]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_plugin_serves_the_searched_nonuniform_plan_like_load_pruned(python, searched):
    root, plan = searched
    export = root / "export"
    _, tokenizer = load_model(export)
    prompts = _heldout_prompts(tokenizer)
    # LLM(model=export) with allocopt's defaults only (memory fraction, seed, the saved dtype); no plugin argument.
    got = run_in(python, export, {"prompts": prompts, "max_new_tokens": NEW_TOKENS, "logprobs": TOP}, root, ENV)
    assert got["model_class"] == "allocopt.serving.vllm_models.OlmoeForCausalLM"
    assert got["experts_per_layer"] == plan.counts                 # vLLM built each layer with its own count
    model = load_pruned(export)
    want = greedy_reference(model, prompts, NEW_TOKENS)
    reference = logprobs_along(model, prompts, got["token_ids"])    # load_pruned in vLLM's contexts
    worst = max(abs(lp - ref[step, int(t)].item()) for row, ref in zip(got["logprobs"], reference)
                for step, top in enumerate(row) for t, lp in top.items())
    same = [g == w for g, w in zip(got["token_ids"], want)]
    print(f"\nvLLM {got['vllm_version']} plugin vs load_pruned on {len(prompts)} held-out prompts x {NEW_TOKENS} tokens: "
          f"identical greedy tokens {sum(same)}/{len(prompts)}, max |top-{TOP} logprob diff| {worst:.2e}, "
          f"experts per layer {got['experts_per_layer']}")
    assert sum(same) >= 20
    assert worst <= 1e-3
    for row, ref in zip(got["logprobs"], reference):
        for step, top in enumerate(row):                            # the same top-5 tokens at every step
            assert {int(t) for t in top} == set(ref[step].topk(TOP).indices.tolist())
    for g, w, ref, ok in zip(got["token_ids"], want, reference, same):
        if not ok:        # where greedy paths part, the two best tokens were tied within the tolerance
            step = next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
            gap = abs(ref[step, g[step]] - ref[step, w[step]]).item()
            print(f"  paths part at step {step}: tokens {g[step]} (vLLM) vs {w[step]} (transformers), "
                  f"log-probability gap {gap:.1e}")
            assert gap <= 1e-3


def test_eval_backend_vllm_equals_the_transformers_path(python, searched):
    from allocopt.evaluation.harness import generation_metrics

    root, _ = searched
    export, limit = root / "export", 48
    proc = subprocess.run([str(python), "-m", "allocopt.cli.main", "eval", "--backend", "vllm", "--model", str(export),
                           "--limit", str(limit), "--out", str(root / "eval.json")], capture_output=True, text=True,
                          cwd=root, env={**__import__("os").environ, **ENV}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    via_vllm = json.loads((root / "eval.json").read_text())
    model, tokenizer = load_model(export)
    via_hf = generation_metrics(model, tokenizer, limit)
    print(f"\nmath EM {limit} items: vLLM {via_vllm['math_em']:.4f}, transformers {via_hf['math_em']:.4f}; "
          f"code EM: vLLM {via_vllm['code_em']:.4f}, transformers {via_hf['code_em']:.4f}")
    assert via_vllm["backend"] == "vllm"
    assert via_vllm["math_em"] == via_hf["math_em"] and via_vllm["math_em_by_form"] == via_hf["math_em_by_form"]
    assert via_vllm["code_em"] == via_hf["code_em"]
    assert via_vllm["code_edit_sim"] == pytest.approx(via_hf["code_edit_sim"], abs=0.02)   # 24 greedy tokens per item


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_plugin_serves_other_families(python, family, tmp_path):
    """Each family's compact non-uniform export: vLLM's per-layer classes give load_pruned's greedy tokens."""
    from allocopt.export import save_pruned

    model = tiny_vllm_model(family, seed=1)
    info = describe(model)
    kept = random_kept(info, (3, 6, 4))
    save_pruned(model, None, tmp_path / "export", Plan.from_counts(info.fingerprint, kept, info.num_experts,
                                                                   {l: len(k) for l, k in kept.items()}))
    prompts = torch.randint(3, 256, (6, 12), generator=torch.Generator().manual_seed(0)).tolist()
    got = run_in(python, tmp_path / "export", {"prompts": prompts, "max_new_tokens": 8, "llm": {
        "skip_tokenizer_init": True, "enforce_eager": True, "dtype": "float32"}}, tmp_path, ENV)
    assert got["model_class"].startswith("allocopt.serving.vllm_models.")
    assert got["experts_per_layer"] == [len(kept[l]) for l in sorted(kept)]
    want = greedy_reference(load_pruned(tmp_path / "export"), prompts, 8)
    assert got["token_ids"] == want


@pytest.mark.parametrize("family", ["glm4_moe", "gpt_oss"])
def test_padded_export_is_served_by_stock_vllm_without_the_plugin(python, family, tmp_path):
    """`--pad`: vLLM's own class (plugin disabled with VLLM_PLUGINS) serves it with the masked model's tokens.
    GLM4-MoE routes like DeepSeek-V3 (sigmoid, correction bias, 2 groups here; the padded experts sit inside each
    group); GPT-OSS has a router bias. GPT-OSS's sliding window is widened past the test's 20 tokens: vLLM and
    transformers disagree on where a window of 16 ends, which would hide what this test is about."""
    from allocopt.export import save_pruned

    model = tiny_vllm_model(family, seed=1, **({"sliding_window": 128} if family == "gpt_oss" else {}))
    info = describe(model)
    kept = random_kept(info, (3, 6, 4))
    prompts = torch.randint(3, 256, (6, 12), generator=torch.Generator().manual_seed(0)).tolist()
    with mask_experts(model, kept):
        want = greedy_reference(model, prompts, 8)
    save_pruned(model, None, tmp_path / "padded", kept, pad=True)
    got = run_in(python, tmp_path / "padded", {"prompts": prompts, "max_new_tokens": 8, "llm": {
        "skip_tokenizer_init": True, "enforce_eager": True, "dtype": "float32"}}, tmp_path,
        {**ENV, "VLLM_PLUGINS": "none-allocopt-disabled"})
    assert got["model_class"].startswith("vllm.model_executor.models.")
    assert got["experts_per_layer"] == [max(len(k) for k in kept.values())] * len(kept)
    assert got["token_ids"] == want


GEN_TASK, GEN_ITEMS = "allocopt_math_gen", 32
# The testbed's math EM as an lm-eval generate_until task: same prompts, greedy, cut at the newline, exact match.
GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def gen_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen_task")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in tasks.math_items()[:GEN_ITEMS]), encoding="utf-8")
    (folder / f"{GEN_TASK}.yaml").write_text(GEN_YAML.format(name=GEN_TASK, data=data), encoding="utf-8")
    return folder


def test_lm_eval_generation_through_vllm_plugin_and_hf_remote_code_agree(python, searched, gen_task):
    """lm-eval's own models on the compact export: `vllm` (allocopt's plugin, in the vLLM environment) and `hf` with
    trust_remote_code (the export's own modelling code); both equal allocopt's math EM on the same items."""
    pytest.importorskip("lm_eval", reason='lm-eval is an optional extra: pip install "allocopt[lm-eval]"')
    pytest.importorskip("lm_eval.models.huggingface", reason='lm-eval[hf] needs accelerate')
    import os

    import lm_eval

    from allocopt.evaluation.harness import math_em
    from allocopt.evaluation.lm_eval_adapter import metric_table, resolve_tasks

    root, _ = searched
    export = root / "export"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([str(python), "-m", "allocopt.cli.main", "eval", "--backend", "vllm", "--model", str(export),
                           "--lm-eval-tasks", GEN_TASK, "--lm-eval-include", str(gen_task), "--out",
                           str(root / "lm_eval.json")],
                          capture_output=True, text=True, cwd=root, env={**os.environ, **ENV, **offline}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    via_vllm = json.loads((root / "lm_eval.json").read_text())["lm_eval"][f"{GEN_TASK}/exact_match"]

    with pytest.MonkeyPatch.context() as mp:
        for k, v in offline.items():
            mp.setenv(k, v)
        manager, names = resolve_tasks([GEN_TASK], gen_task)
        results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export), "trust_remote_code": True,
                                                                  "device": "cpu", "dtype": "float32"},
                                          tasks=names, task_manager=manager)
    via_hf = metric_table(results)[f"{GEN_TASK}/exact_match"]
    model, tokenizer = load_model(export)
    ours, _ = math_em(model, tokenizer, GEN_ITEMS)
    print(f"\nlm-eval generate_until math EM ({GEN_ITEMS} items): vllm model {via_vllm:.4f}, hf model (remote code) "
          f"{via_hf:.4f}, allocopt math_em {ours:.4f}")
    assert via_vllm == via_hf == pytest.approx(ours)
