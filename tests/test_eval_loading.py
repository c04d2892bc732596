"""`allocopt eval` takes the same loading options on every backend (issue #20), and each backend honours each one
or refuses it in one line (exit 2). What each backend does with each option of ``LoadOptions``:

option               testbed tasks / lm-eval hf (allocopt loads)    vLLM (generation tasks, lm-eval's vllm model)
--device             load_model                                     auto or vLLM's own device; else refused
--dtype              load_model                                     float16/bfloat16/float32 -> dtype; else refused
--device-map         load_model (accelerate)                        refused (vLLM places the model itself)
--max-memory         load_model (accelerate)                        refused (no per-device limits in vLLM)
--offload-dir        load_model (accelerate disk offload)           refused (vLLM has no disk offload)
--trust-remote-code  load_model (+ context check)                   trust_remote_code (engine and tokenizer)

lm-eval's HFLM gets the loaded model (its own dtype/offload arguments apply only to a model it loads itself); the
tests run a real lm-eval task on the shipped testbed and read back what lm-eval ran.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.errors import AllocoptError
from allocopt.evaluation.likelihood import multiple_choice_accuracy
from allocopt.runtime import load_model
from allocopt.runtime.loading import LoadOptions
from allocopt.serving.vllm_engine import VLLM_DTYPES, engine_kwargs
from reliability_kit import ENV, remote_code_copy
from lm_eval_kit import ITEMS, MC_TASK

LIMIT = ITEMS                  # every item of the shared task, so allocopt's accuracy covers what lm-eval scored
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}



def _eval(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def _lm_eval(task_dir: Path, *args: str) -> dict:
    return _eval("--lm-eval-tasks", MC_TASK, "--lm-eval-include", str(task_dir), "--limit", str(LIMIT), *args)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def plain(lm_eval_offline, task_dir) -> dict:
    """The testbed through lm-eval with no loading option: the checkpoint's float32, on one device."""
    return _lm_eval(task_dir)


# ---- lm-eval, transformers backend ------------------------------------------------------------------------------

def test_lm_eval_runs_the_model_in_the_dtype_asked_for(plain, task_dir, items):
    assert plain["model_dtype"] == "float32"
    got = _lm_eval(task_dir, "--dtype", "bfloat16")
    assert got["model_dtype"] == "bfloat16"                       # lm-eval's own report of the model it ran
    model, tokenizer = load_model("testbed", dtype="bfloat16")
    assert got["lm_eval"][f"{MC_TASK}/acc_norm"] == pytest.approx(multiple_choice_accuracy(model, tokenizer, items))


def test_lm_eval_offloads_under_max_memory_and_offload_dir(plain, task_dir, tmp_path):
    folder = tmp_path / "offload"
    got = _lm_eval(task_dir, "--max-memory", "cpu=3MiB", "--offload-dir", str(folder))
    assert sorted(folder.rglob("*.safetensors")), "nothing was offloaded to disk"  # the weights beyond 3 MiB went there
    assert got["model_dtype"] == "float32"
    assert got["lm_eval"] == pytest.approx(plain["lm_eval"])     # the same model, layers read back from disk


def test_lm_eval_device_map_alone_is_the_same_model(plain, task_dir):
    assert _lm_eval(task_dir, "--device-map", "auto")["lm_eval"] == pytest.approx(plain["lm_eval"])


# ---- trust_remote_code ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> tuple[Path, Path]:
    """The testbed re-labelled as model_type "marker_moe", whose classes live in the checkpoint's own remote_code.py;
    importing that file writes the marker."""
    return remote_code_copy("testbed", tmp_path_factory.mktemp("remote") / "model")


def _eval_subprocess(tmp_path: Path, *args: str) -> dict:
    """`allocopt eval` in its own process (remote code is imported there, into a module cache under tmp_path)."""
    out = tmp_path / "metrics.json"
    env = {**ENV, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules")}
    proc = subprocess.run([sys.executable, "-m", "allocopt.cli.main", "eval", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_remote_code_is_refused_without_the_flag_on_every_backend(remote, task_dir, lm_eval_offline):
    ckpt, marker = remote
    for extra in ([], ["--lm-eval-tasks", MC_TASK, "--lm-eval-include", str(task_dir)]):
        message = _one_error_line(CliRunner().invoke(cli, ["eval", "--model", str(ckpt), "--limit", "2", *extra]))
        assert "needs its own Python code" in message and "--trust-remote-code" in message
    assert not marker.exists()


def test_lm_eval_runs_remote_code_with_the_flag(remote, plain, task_dir, tmp_path):
    ckpt, marker = remote
    got = _eval_subprocess(tmp_path, "--model", str(ckpt), "--lm-eval-tasks", MC_TASK, "--lm-eval-include",
                           str(task_dir), "--limit", str(LIMIT), "--trust-remote-code")
    assert marker.read_text() == "imported"                    # lm-eval ran the checkpoint's own class
    assert got["lm_eval"] == pytest.approx(plain["lm_eval"])   # which is the testbed under another name


def test_testbed_tasks_run_remote_code_with_the_flag(remote, tmp_path):
    ckpt, marker = remote
    marker.unlink(missing_ok=True)
    got = _eval_subprocess(tmp_path, "--model", str(ckpt), "--limit", "2", "--trust-remote-code")
    assert marker.read_text() == "imported"
    assert got["math_em"] == _eval("--model", "testbed", "--limit", "2")["math_em"]


# ---- allocopt's own tasks --------------------------------------------------------------------------------------

def test_testbed_tasks_take_dtype_and_offload(tmp_path):
    assert _eval("--limit", "2", "--dtype", "bfloat16")["model_dtype"] == "bfloat16"
    plain = _eval("--limit", "2")
    offloaded = _eval("--limit", "2", "--max-memory", "cpu=3MiB", "--offload-dir", str(tmp_path / "off"))
    assert sorted((tmp_path / "off").rglob("*.safetensors"))          # offloaded, or the converted copy they load from
    assert offloaded["ppl"] == pytest.approx(plain["ppl"]) and offloaded["math_em"] == plain["math_em"]


# ---- vLLM: the translation of LoadOptions into engine keywords ----------------------------------------------------

def test_vllm_engine_kwargs_honour_dtype_and_trust_remote_code():
    assert engine_kwargs(None) == {"dtype": "auto", "trust_remote_code": False}
    assert engine_kwargs(LoadOptions(), "float32", "cpu") == {"dtype": "float32", "trust_remote_code": False}
    for dtype in VLLM_DTYPES:
        assert engine_kwargs(LoadOptions(dtype=dtype), "float32", "cuda")["dtype"] == dtype
    assert engine_kwargs(LoadOptions(trust_remote_code=True), "float32")["trust_remote_code"] is True
    for device, platform in (("auto", "cuda"), ("cuda", "cuda"), ("cuda:0", "cuda"), ("cpu", "cpu"), ("auto", "cpu"),
                             ("cuda:3", None)):                # platform None: vLLM not imported yet, not checked
        assert engine_kwargs(LoadOptions(device=device), "bfloat16", platform) == {"dtype": "bfloat16",
                                                                                    "trust_remote_code": False}


@pytest.mark.parametrize("options, platform, words", [
    (LoadOptions(device_map="auto"), None, ["--device-map auto", "--backend transformers"]),
    (LoadOptions(max_memory={"cuda:0": "70GiB", "cpu": "9GiB"}), None,
     ["--max-memory cuda:0=70GiB cpu=9GiB", "cpu_offload_gb", "--backend transformers"]),
    (LoadOptions(offload_dir="/tmp/off"), None, ["--offload-dir /tmp/off", "no disk offload", "--backend transformers"]),
    (LoadOptions(dtype="float64"), None, ["--dtype float64", "float16, bfloat16, float32"]),
    (LoadOptions(device="cuda:1"), "cuda", ["--device cuda:1", "CUDA_VISIBLE_DEVICES=1"]),
    (LoadOptions(device="cpu"), "cuda", ["--device cpu", "runs on the first visible GPU"]),
    (LoadOptions(device="cuda"), "cpu", ["--device cuda", "runs on cpu"]),
])
def test_vllm_engine_kwargs_refuse_what_vllm_cannot_do_in_one_line(options, platform, words):
    with pytest.raises(AllocoptError) as err:
        engine_kwargs(options, "float32", platform)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_vllm_engine_kwargs_are_lm_eval_vllm_model_arguments():
    """The keys are named parameters of lm-eval's ``vllm`` model (read from its source: importing it needs vLLM)."""
    lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is an optional extra: pip install "allocopt[lm-eval]"')
    source = Path(lm_eval.__file__).parent / "models" / "vllm_causallms.py"
    init = next(node for node in ast.walk(ast.parse(source.read_text(encoding="utf-8")))
                if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    assert set(engine_kwargs(LoadOptions(dtype="bfloat16", trust_remote_code=True))) <= {a.arg for a in init.args.args}


@pytest.mark.parametrize("option", [["--device-map", "auto"], ["--max-memory", "cpu=1GiB"], ["--offload-dir", "off"],
                                    ["--dtype", "float64"]])
@pytest.mark.parametrize("tasks", [[], ["--lm-eval-tasks", MC_TASK]])
def test_eval_backend_vllm_refuses_unsupported_options_before_loading(option, tasks):
    message = _one_error_line(CliRunner().invoke(cli, ["eval", "--backend", "vllm", *tasks, *option]))
    assert message.startswith(f"error: {option[0]} ") and "vLLM" in message


def test_run_lm_eval_vllm_refuses_before_indexing_tasks():
    from allocopt.evaluation.lm_eval_adapter import run_lm_eval

    with pytest.raises(AllocoptError, match="^--offload-dir off: vLLM has no disk offload"):
        run_lm_eval("testbed", ["no_such_task"], backend="vllm", options=LoadOptions(offload_dir="off"))


@pytest.mark.slow
def test_vllm_generation_runs_in_the_dtype_asked_for(tmp_path):
    """In vLLM's own environment (``bash .ci/vllm-venv``): ``--dtype`` reaches the engine."""
    from vllm_kit import ENV as VLLM_ENV, vllm_python

    out = tmp_path / "eval.json"
    proc = subprocess.run([str(vllm_python()), "-m", "allocopt.cli.main", "eval", "--backend", "vllm", "--model",
                           "testbed", "--limit", "2", "--dtype", "bfloat16", "--out", str(out)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, **VLLM_ENV}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text(encoding="utf-8"))["model_dtype"] == "bfloat16"
