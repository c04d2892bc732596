"""Shared pieces of the reliability tests: a tiny saved OLMoE with its own tokenizer, `allocopt` as a real
subprocess, and counts read back from a study."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

TEXT = " ".join(f"expert {i % 11} takes token {i % 7} in layer {i % 3} while {i % 5} others wait" for i in range(300))
# Small enough for ~1 s of search per dozen plans on one core.
SMALL = ["--seq-len", "24", "--num-seqs", "4", "--calib-num-seqs", "6", "--sparsity", "0.5", "--criterion", "reap",
         "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def save_tokenizer(directory: Path) -> Path:
    """A BPE tokenizer (vocab 120, within every tiny model's 256) trained on TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "[PAD]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(directory)
    return directory


def save_tiny_model(directory: Path, seed: int = 3, family: str = "olmoe", **overrides) -> Path:
    """A 3-layer tiny model of ``family`` (8 experts, top-2) with a BPE tokenizer trained on TEXT, as safetensors."""
    from allocopt.testing.tiny import build_tiny_model

    save_tokenizer(directory)
    build_tiny_model(family, seed=seed, **overrides).save_pretrained(directory)
    return directory


def overflow_in_float16(model, layer: int = 1, scale: float = 1e5):
    """Scale one MoE router so its logits reach ~2e5: finite in float32 and bfloat16 (max ~3e38), inf in float16
    (max 65504), while the scaled weights themselves (~3e4) still fit in float16. Returns the model."""
    import torch

    with torch.no_grad():
        model.model.layers[layer].mlp.gate.weight.mul_(scale)
    return model


def make_root(root: Path, model: bool = True) -> Path:
    """``root/model`` (unless the caller saved its own) and ``root/data.txt``."""
    if model:
        save_tiny_model(root / "model")
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    return root


def run_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["run", "--model", str(root / "model"), "--data", str(root / "data.txt"), *SMALL,
            "--out", str(root / "runs" / name), "--name", name, *extra]


def allocopt(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``allocopt ARGS`` in a fresh interpreter, output captured as text."""
    return subprocess.run([sys.executable, "-m", "allocopt.cli.main", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kwargs)


def popen(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "allocopt.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kwargs)


def sqlite_url(root: Path, name: str) -> str:
    return f"sqlite:///{(root / 'runs' / f'{name}.db').resolve()}"


def trial_counts(storage: str, name: str) -> dict[str, int]:
    """COMPLETE trials, their distinct allocations, duplicates among them, and trials per state."""
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    complete = [tuple(t.user_attrs["allocation"]) for t in trials if t.state == TrialState.COMPLETE]
    states = collections.Counter(t.state.name for t in trials)
    return {"complete": len(complete), "distinct": len(set(complete)), "duplicated": len(complete) - len(set(complete)),
            "running": states.get("RUNNING", 0), "waiting": states.get("WAITING", 0), "fail": states.get("FAIL", 0),
            "pruned": states.get("PRUNED", 0)}


def complete_allocations(storage: str, name: str) -> set[tuple[int, ...]]:
    study = optuna.load_study(study_name=name, storage=storage)
    return {tuple(t.user_attrs["allocation"]) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def pruned_allocations(storage: str, name: str) -> list[tuple[int, ...]]:
    """Allocations of PRUNED trials (racing), sorted; a plan appears once per PRUNED trial."""
    study = optuna.load_study(study_name=name, storage=storage)
    return sorted(tuple(t.user_attrs["allocation"]) for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))


# A checkpoint whose model_type ("marker_moe") only its own remote_code.py defines; importing that file writes a marker.
REMOTE_CODE = '''
from pathlib import Path
from transformers import OlmoeConfig, OlmoeForCausalLM

Path({marker!r}).write_text("imported")


class MarkerMoeConfig(OlmoeConfig):
    model_type = "marker_moe"


class MarkerMoeForCausalLM(OlmoeForCausalLM):
    config_class = MarkerMoeConfig
'''


def remote_code_copy(source: str | Path, ckpt: Path) -> tuple[Path, Path]:
    """``ckpt``: the OLMoE-type checkpoint ``source`` (a directory or ``testbed``) re-labelled as model_type
    "marker_moe", whose classes live in the checkpoint's own remote_code.py; returns ``(ckpt, marker)``, the file that
    importing that code writes. transformers converts stock checkpoints' per-expert tensors to fused ones only for its
    own classes, never for remote code, so the copy stores the fused tensors its code expects."""
    import json

    from safetensors.torch import save_file

    from allocopt.runtime import load_model
    from allocopt.runtime.loading import resolve

    marker = ckpt.parent / "remote_code_ran"
    ckpt.mkdir()
    for f in resolve(source).iterdir():
        if not f.name.endswith(".safetensors"):
            (ckpt / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="marker_moe", architectures=["MarkerMoeForCausalLM"],
                  auto_map={"AutoConfig": "remote_code.MarkerMoeConfig",
                            "AutoModelForCausalLM": "remote_code.MarkerMoeForCausalLM"})
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "remote_code.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    model, _ = load_model(str(source))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    return ckpt, marker
