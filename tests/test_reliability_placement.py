"""Bad placement input and damaged checkpoints through the real CLI (issue #21, findings 7 and 8).

Every case runs `allocopt info`, `esap` or `observe` (click's CliRunner; a real subprocess where the disk must be
"full", which RLIMIT_FSIZE stands in for) and must exit 2 with exactly one stderr line "error: ..." naming the option
or the file, the problem and the fix, show no traceback and leave every file under the fixture root as it was: no
offload folder, statistics folder or probe file left behind.

* **Placement** (``--device``, ``--device-map``, ``--max-memory DEVICE=SIZE``, ``--offload-dir``) is checked
  against this machine before anything loads. Devices that are absent here are named by index past
  ``torch.cuda.device_count()``, so the cases refuse on a GPU machine too. Tests run as root, where permission bits
  do not stop writes: an offload folder that cannot be created is one below a regular file.
* **Damaged checkpoints**: a tiny OLMoE saved the way published checkpoints are (``save_pretrained(...,
  max_shard_size="50KB")``: 15 shards and model.safetensors.index.json), then damaged on disk: a shard deleted, cut
  short (os.truncate), with a garbled header or bytes appended, an index naming a missing shard, placing a tensor in
  a shard that does not hold it, or not JSON; also a truncated single-file allocopt export (esap --pruned).
  The headers are checked before loading; a shard that still fails inside transformers is turned into the same
  line where the model loads (shown with the header check switched off).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.runtime.converted import VIEW_DIR
from reliability_kit import ENV, TEXT, save_tokenizer

DAMAGED = "the checkpoint is incomplete or damaged: copy it again from its source"
SHORT = ["--seq-len", "24", "--num-seqs", "4"]
ABSENT_CUDA = f"cuda:{torch.cuda.device_count()}"         # one index past the GPUs this machine has (none: cuda:0)
OFFLOAD = ["--max-memory", "cpu=300KB"]                   # the tiny model's experts then go to the offload folder
SHARD = "model-{:05d}-of-00015.safetensors"


def _save_sharded(directory: Path) -> Path:
    from allocopt.testing.tiny import build_tiny_model

    save_tokenizer(directory)
    build_tiny_model("olmoe", seed=3).save_pretrained(directory, max_shard_size="50KB")
    assert (directory / "model.safetensors.index.json").is_file() and (directory / SHARD.format(15)).is_file()
    return directory


def _edit_index(directory: Path, change: Callable[[dict], None]) -> None:
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data, indent=2))


def _damage(root: Path) -> None:
    """Copies of root/model, each damaged one way."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(root / "model", root / name))

    (copy("missing_shard") / SHARD.format(3)).unlink()
    cut = copy("truncated_shard") / SHARD.format(4)
    os.truncate(cut, cut.stat().st_size // 2)
    os.truncate(copy("header_only") / SHARD.format(5), 20)                  # shorter than the header it announces
    with open(copy("garbled_header") / SHARD.format(6), "r+b") as fh:       # the JSON header overwritten
        fh.seek(8)
        fh.write(b"\xff\xfe not json")
    with open(copy("appended_bytes") / SHARD.format(2), "ab") as fh:        # a copy that got more than it should
        fh.write(b"\0" * 64)
    _edit_index(copy("index_missing_file"), lambda wm: wm.update({next(iter(wm)): "model-00099-of-00015.safetensors"}))

    def move(wm: dict) -> None:                                             # a tensor placed in the wrong shard
        name = next(k for k, v in wm.items() if v == SHARD.format(3))
        wm[name] = SHARD.format(1)
    _edit_index(copy("index_wrong_shard"), move)
    (copy("index_not_json") / "model.safetensors.index.json").write_text('{"weight_map": {')


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from allocopt.models import describe
    from allocopt.plan import Plan
    from allocopt.runtime import load_model

    root = tmp_path_factory.mktemp("placement")
    _save_sharded(root / "model")
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    info = describe(load_model(root / "model", device="cpu")[0])
    plan = Plan.from_counts(info.fingerprint, {l.index: list(range(l.num_experts)) for l in info.layers},
                            {l.index: l.num_experts for l in info.layers}, {l.index: 4 for l in info.layers})
    plan.save(root / "plan.json")
    export = CliRunner().invoke(cli, ["prune", "--plan", str(root / "plan.json"), "--model", str(root / "model"),
                                      "--out", str(root / "export"), "--quiet"])
    assert export.exit_code == 0, export.output
    _damage(root)
    shutil.copytree(root / "export", root / "export_cut")
    for shard in (root / "export_cut").glob("*.safetensors"):
        os.truncate(shard, shard.stat().st_size - 100)
    (root / "blocker").write_text("a regular file where a folder is expected\n")
    return root


# ---- the commands, on a model of the fixture ---------------------------------------------------------------

def info(model: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda r: ["info", "--model", str(r / model), *extra]


def esap(model: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda r: ["esap", "--model", str(r / model), "--plan", str(r / "plan.json"), "--data", str(r / "data.txt"),
                      *SHORT, *extra]


def observe(model: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda r: ["observe", "--model", str(r / model), "--data", str(r / "data.txt"), *SHORT, "--no-progress",
                      "--out", str(r / "stats" / "s.safetensors"), *extra]


COMMANDS = {"info": info, "esap": esap, "observe": observe}


@dataclass(frozen=True)
class Case:
    label: str
    args: Callable[[Path], list[str]]
    words: tuple[str, ...]                       # must all appear in the one error line


def _everywhere(label: str, model: str, extra: tuple[str, ...], words: tuple[str, ...]) -> list[Case]:
    return [Case(f"{label} ({name})", command(model, *extra), words) for name, command in COMMANDS.items()]


PLACEMENT = [
    *_everywhere("a GPU this machine lacks in --max-memory", "model", ("--max-memory", f"{ABSENT_CUDA}=10GiB"),
                 (f"--max-memory {ABSENT_CUDA}=10GiB: this machine has", "cuda device", f"leave out {ABSENT_CUDA}=SIZE")),
    *_everywhere("a size on the disk", "model", ("--max-memory", "disk=1KB", "--offload-dir", "off"),
                 ("--max-memory disk=1KB: the disk takes no limit", "go to --offload-dir", "leave out disk=SIZE")),
    *_everywhere("the offload folder below a file", "model", (*OFFLOAD, "--offload-dir", "blocker/off"),
                 ("--offload-dir", "blocker/off cannot be created", "is a file, not a folder", "pass --offload-dir DIR")),
    *_everywhere("a --device this machine lacks", "model", ("--device", ABSENT_CUDA),
                 (f"--device {ABSENT_CUDA}: this machine has", "use --device auto")),
    Case("a size of zero", info("model", "--max-memory", "cpu=0GiB", "--offload-dir", "off"),
         ("--max-memory cpu=0GiB gives that device no memory", "above zero")),
    Case("a size that is not one", observe("model", "--max-memory", "cpu=lots"),
         ("--max-memory cpu=lots: 'lots' is not a size", "cpu=600MiB")),
    Case("two limits for one device", esap("model", "--max-memory", "CPU=1GiB", "--max-memory", "cpu=2GiB"),
         ("--max-memory cpu=2GiB: CPU and cpu name the same device", "one limit")),
    Case("not a device in --max-memory", info("model", "--max-memory", "tpu=1GiB"),
         ("--max-memory tpu=1GiB: 'tpu' is not a device", "cuda:N, xpu:N, mps or cpu")),
    Case("not a --device", info("model", "--device", "gpu0"), ("--device gpu0 is not a torch device", "auto, cpu")),
    Case("--device meta", esap("model", "--device", "meta"), ("--device meta holds no weights",)),
    *([] if torch.backends.mps.is_available() else [
        Case("mps on a machine without it", info("model", "--max-memory", "mps=1GiB"),
             ("--max-memory mps=1GiB: this machine has no mps device", "--max-memory cpu=SIZE")),
        Case("--device mps on a machine without it", observe("model", "--device", "mps"),
             ("--device mps: this machine has no mps device",))]),
    Case("xpu past the ones this machine has", info("model", "--max-memory", "xpu:7=1GiB"),
         ("--max-memory xpu:7=1GiB: this machine has", "xpu device")),
    Case("placement is checked before the checkpoint", info("missing_shard", "--device", "gpu0"),
         ("--device gpu0 is not a torch device",)),
]

DAMAGE = [
    *_everywhere("a shard deleted", "missing_shard", (),
                 ("model.safetensors.index.json names shard model-00003-of-00015.safetensors, which does not exist",)),
    *_everywhere("a shard cut short", "truncated_shard", (),
                 ("model-00004-of-00015.safetensors is", "bytes but its header describes", "a truncated copy")),
    *_everywhere("a shard shorter than its header", "header_only", (),
                 ("model-00005-of-00015.safetensors has no readable safetensors header", "runs past the end")),
    *_everywhere("a garbled header", "garbled_header", (),
                 ("model-00006-of-00015.safetensors has no readable safetensors header", "not JSON")),
    *_everywhere("bytes appended to a shard", "appended_bytes", (),
                 ("model-00002-of-00015.safetensors is", "bytes its header does not describe")),
    *_everywhere("the index names a missing file", "index_missing_file", (),
                 ("names shard model-00099-of-00015.safetensors, which does not exist",)),
    *_everywhere("the index places a tensor in the wrong shard", "index_wrong_shard", (),
                 ("places tensor", "in model-00001-of-00015.safetensors, which does not hold it")),
    *_everywhere("the index is not JSON", "index_not_json", (),
                 ("model.safetensors.index.json is not a readable shard index",)),
    Case("a damaged export (esap --pruned)",
         lambda r: ["esap", "--model", str(r / "model"), "--pruned", str(r / "export_cut"), "--data", str(r / "data.txt"),
                    *SHORT],
         ("export_cut/model", ".safetensors is", "a truncated copy")),
    *_everywhere("a deleted shard with an offload folder asked for", "missing_shard", (*OFFLOAD, "--offload-dir", "off/a"),
                 ("which does not exist",)),
]
CASES = PLACEMENT + DAMAGE


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _one_line_refusal(root: Path, args: list[str], words: tuple[str, ...], cwd: Path | None = None) -> str:
    """Run ``allocopt ARGS`` in-process; check exit 2, one "error:" line holding ``words``, no traceback, no change."""
    before = _snapshot(root)
    old = os.getcwd()
    os.chdir(cwd or root)                              # relative --offload-dir paths land under root
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)
    crash = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crash = "".join(traceback.format_exception(result.exception))
    assert crash is None, crash
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, result.stderr)
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in {lines[0]!r}"
    after = _snapshot(root)
    assert after == before, f"files changed: {sorted(set(before.items()) ^ set(after.items()))}"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_refused_in_one_line_before_loading_and_nothing_written(root, case):
    message = _one_line_refusal(root, case.args(root), case.words)
    if case in DAMAGE:
        assert message.endswith(DAMAGED) and message.count(DAMAGED) == 1, message


def test_good_placement_loads_and_leaves_only_the_offloaded_weights(root, tmp_path):
    """The checks refuse nothing that works: the same sharded model loads with a new nested offload folder (created,
    probed, kept with the offloaded weights and no probe file) and scores a plan under it."""
    folder = tmp_path / "new" / "offload"
    result = CliRunner().invoke(cli, info("model", *OFFLOAD, "--offload-dir", str(folder))(root))
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in folder.iterdir())        # offloaded weights, and the converted copy they load from
    assert written and all(name.endswith(".safetensors") and not name.startswith(".") or name == VIEW_DIR
                           for name in written), written
    assert not list(folder.rglob(".allocopt-offload-*")) and not list(folder.rglob("*.tmp"))
    scored = CliRunner().invoke(cli, esap("model", *OFFLOAD, "--offload-dir", str(folder), "--json")(root))
    assert scored.exit_code == 0, scored.output
    assert sorted(p.name for p in folder.iterdir()) == written


def test_a_shard_that_fails_inside_transformers_gets_the_same_line(root, tmp_path, monkeypatch):
    """With the header check switched off, the same damage reaches transformers' loader (FileNotFoundError,
    SafetensorError): where the model loads it becomes the one-line error, and the offload folder this run created
    goes again."""
    import allocopt.runtime.loading as loading

    monkeypatch.setattr(loading, "check_checkpoint_files", lambda path: None)
    for model, words in (("missing_shard", ("model-00003-of-00015.safetensors", "No such file")),
                         ("truncated_shard", ("could not be read",)),
                         ("header_only", ("could not be read", "header")),
                         ("index_missing_file", ("model-00099-of-00015.safetensors",))):
        for extra in ((), (*OFFLOAD, "--offload-dir", "late/off")):
            message = _one_line_refusal(root, info(model, *extra)(root), words)
            assert message.endswith(DAMAGED), message


def _full_disk(root: Path, fsize: int, folder: str) -> str:
    """`allocopt info` offloading into ``folder`` with files limited to ``fsize`` bytes (RLIMIT_FSIZE: writes past it
    fail with EFBIG, as writes on a full disk fail with ENOSPC); its one stderr line."""
    before = _snapshot(root)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))   # noqa: E731
    out = subprocess.run([sys.executable, "-m", "allocopt.cli.main", "info", "--model", str(root / "model"), *OFFLOAD,
                          "--offload-dir", folder], capture_output=True, text=True, timeout=300, cwd=root,
                         env={**ENV, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, preexec_fn=limit)
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: --offload-dir "), lines
    assert _snapshot(root) == before, "the refused run left files behind"
    return lines[0]


def test_a_full_offload_folder_is_refused_before_loading(root):
    """Too little room even for the 4 KiB probe: refused before any weight loads, the folder it made removed."""
    message = _full_disk(root, 1000, "full/off")
    assert "--offload-dir full/off cannot hold files (File too large)" in message and "pass --offload-dir DIR" in message


def test_an_offload_folder_that_fills_up_while_loading_is_one_line(root):
    """Room for the probe but not for the first offloaded expert tensor (~190 KB): the write fails inside
    transformers; the one line names --offload-dir and the fix, and the folder with its partial files goes."""
    message = _full_disk(root, 100_000, "fills/off")
    assert "--offload-dir fills/off could not take the offloaded weights (File too large" in message
    assert "free space there or pass an --offload-dir with room" in message


def test_a_full_offload_folder_that_existed_keeps_its_own_files_only(root, tmp_path):
    """An --offload-dir that was there before the refused run loses only the files that run added."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))   # noqa: E731
    out = subprocess.run([sys.executable, "-m", "allocopt.cli.main", "info", "--model", str(root / "model"), *OFFLOAD,
                          "--offload-dir", str(folder)], capture_output=True, text=True, timeout=300,
                         env={**ENV, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, preexec_fn=limit)
    assert out.returncode == 2 and "could not take the offloaded weights" in out.stderr, out.stderr
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_device_indices_are_checked_against_the_gpus_there_are(monkeypatch):
    """On a machine with two GPUs (torch's count stubbed: this one may have none) cuda:0 and cuda:1 pass, cuda:2 is
    refused naming the two there are, and two spellings of one GPU are refused as one device limited twice."""
    from allocopt.errors import AllocoptError
    from allocopt.runtime.loading import LoadOptions, check_placement, parse_max_memory

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_max_memory({"cuda:1": "1GiB", "0": "2GiB", "cpu": "3GiB"}) == {1: "1GiB", 0: "2GiB", "cpu": "3GiB"}
    check_placement(LoadOptions(device="cuda:1", max_memory={"gpu": "1GiB"}))
    for options, words in ((LoadOptions(max_memory={"cuda:2": "1GiB"}), "--max-memory cuda:2=1GiB: this machine has 2 "
                            "cuda devices (cuda:0, cuda:1); leave out cuda:2=SIZE"),
                           (LoadOptions(device="cuda:2"), "--device cuda:2: this machine has 2 cuda devices (cuda:0, cuda:1)"),
                           (LoadOptions(max_memory={"cuda": "1GiB", "cuda:0": "2GiB"}),
                            "--max-memory cuda:0=2GiB: cuda and cuda:0 name the same device"),
                           (LoadOptions(device_map="everywhere"), "--device-map everywhere is not a placement")):
        with pytest.raises(AllocoptError) as err:
            check_placement(options)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
