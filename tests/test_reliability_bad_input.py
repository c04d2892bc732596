"""Bad input through the real CLI (issue 7.3): every case exits non-zero with exactly one stderr line
"error: ..." that names the problem, shows no traceback, and leaves every file that existed before
byte-identical with no temporary file behind.

Most cases run in-process through click's CliRunner (the same parse -> library -> error path as the
console script, without paying a fresh torch import per case); those marked ``process`` run `allocopt`
as a real subprocess, which the disk-full cases need for their RLIMIT_FSIZE. Tests run as root here, so
"not writable" is an --out below a regular file (root ignores permission bits). A NaN/inf candidate is
not an input error: it must fail only that trial and let the search finish (last test).

The table of what each case printed is written to /tmp/bad_input_table.md (and printed with ``-s``).
"""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sqlite3
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import pytest
import torch
import transformers
from click.testing import CliRunner
from optuna.trial import TrialState

from allocopt.calibration import RoutingStats
from allocopt.cli.main import cli
from reliability_kit import SMALL, TEXT, allocopt, make_root, overflow_in_float16, run_args, save_tiny_model

TABLE = Path("/tmp/bad_input_table.md")
SHORT = ["--seq-len", "24", "--num-seqs", "4"]      # esap / observe: the sizes SMALL gives `run`


@dataclass(frozen=True)
class Case:
    label: str                                   # the "input" column of the table
    args: Callable[[Path], list[str]]            # argv after `allocopt`, given the fixture root
    words: tuple[str, ...]                       # must all appear in the one error line
    process: bool = False                        # a real subprocess instead of CliRunner
    fsize: int | None = None                     # RLIMIT_FSIZE bytes for that process: "the disk is full"
    watch: tuple[str, ...] = field(default=())   # files/dirs (relative to root) the case tries to overwrite


def _run(root: Path, *extra: str, model: str = "model", data: str = "data.txt", out: str = "runs/x") -> list[str]:
    """`allocopt run` on the fixture's inputs (names relative to root), small enough to fail or finish fast."""
    return ["run", "--model", str(root / model), "--data", str(root / data), *SMALL, "--out", str(root / out),
            "--name", "x", *extra]


CASES = [
    Case("unknown criterion", lambda r: _run(r, "--criterion", "loudness"),
         ("unknown criterion 'loudness'", "reap", "frequency", "unified"), process=True),
    Case("unknown optimizer", lambda r: _run(r, "--optimizer", "annealing"),
         ("unknown optimizer 'annealing'", "ga", "nsga2", "cmaes", "tpe")),
    Case("budget too small for dp", lambda r: _run(r, "--optimizer", "dp", "--evals", "3"),
         ("dp needs at least 8 evaluations", "raise --evals")),
    Case("dp probes on partial rows in a search that scores whole plans (dp_rows with --workers 2)",
         lambda r: _run(r, "--optimizer", "dp", "--option", "dp_rows=4", "--workers", "2", "--evals", "5"),
         ("dp needs at least 8 evaluations", "dp_rows needs partial scoring", "--workers > 1", "raise --evals"),
         process=True),
    Case("dp probes on more rows than the search set has", lambda r: _run(r, "--optimizer", "dp", "--option", "dp_rows=9"),
         ("--option dp_rows=9 is more than the search set's 4 rows", "use at most 4", "leave dp_rows out")),
    Case("a race whose first stage has more rows than the search set", lambda r: _run(r, "--option", "race_first_rows=5"),
         ("--option race_first_rows=5 is more than the search set's 4 rows", "use at most 4")),
    Case("dp probes too few for a count either side", lambda r: _run(r, "--optimizer", "dp", "--option", "dp_probes=1"),
         ("--option dp_probes=1 must be >= 2", "raise it")),
    Case("ga's warm start refuses the same dp probes", lambda r: _run(r, "--option", "dp_probes=1"),
         ("--option dp_probes=1 must be >= 2", "raise it")),
    Case("dp probes the budget cannot pay", lambda r: _run(r, "--optimizer", "dp", "--evals", "13", "--option", "dp_probes=5"),
         ("dp needs at least 17 evaluations", "5 probes per layer", "raise --evals or lower dp_probes")),
    Case("optimizer option of the wrong type", lambda r: _run(r, "--option", "race_z=often"),
         ("--option race_z='often' is not a float",)),
    Case("option without a default gets a typed example", lambda r: _run(r, "--optimizer", "dp", "--option", "dp_rows=some"),
         ("--option dp_rows='some' is not an int; e.g. --option dp_rows=4",)),
    Case("optimizer option out of its choices", lambda r: _run(r, "--option", "restart=never"),
         ("--option restart='never' must be one of step, dp",)),
    Case("unknown objective (run)", lambda r: _run(r, "--objective", "bleu"),
         ("unknown objective 'bleu'", "esap", "kl_pq", "nll")),
    Case("unknown objective (esap)", lambda r: ["esap", "--model", str(r / "model"), "--plan", str(r / "runs/base/plan.json"),
                                                 "--data", str(r / "data.txt"), *SHORT, "--objective", "bleu"],
         ("unknown objective 'bleu'", "esap", "kl_qp")),
    Case("impossible budget (sparsity 0.9 < top-k per layer)", lambda r: _run(r, "--sparsity", "0.9"),
         ("keeping 2 of 24 experts is impossible", "6..24", "top-k")),
    Case("sparsity that rounds to no expert (0.01 of 24)", lambda r: _run(r, "--sparsity", "0.01"),
         ("sparsity 0.01 removes 0.24 of 24 routed experts", "rounds to none", "at least 0.02084 (removes 1 expert)")),
    Case("--seq-len beyond the model's context (run)", lambda r: _run(r, "--seq-len", "200"),
         ("--seq-len 200 is longer than the context of model", "(128 tokens, config.max_position_embeddings)",
          "use --seq-len 128 or less", "--allow-long-context", "allow_long_context = true")),
    Case("calib_seq_len beyond the model's context (problem file)", lambda r: ["run", "--problem", str(r / "long.toml")],
         ("calib_seq_len 300 is longer than the context of model", "(128 tokens", "use calib_seq_len 128 or less")),
    Case("--seq-len beyond the model's context (observe)",
         lambda r: ["observe", "--model", str(r / "model"), "--data", str(r / "data.txt"), "--seq-len", "200", "--num-seqs", "2",
                    "--no-progress", "--out", str(r / "long.safetensors")],
         ("--seq-len 200 is longer than the context of model", "use --seq-len 128 or less", "--allow-long-context")),
    Case("--seq-len beyond the model's context (esap)",
         lambda r: ["esap", "--model", str(r / "model"), "--plan", str(r / "runs/base/plan.json"), "--data", str(r / "data.txt"),
                    "--seq-len", "200", "--num-seqs", "2"],
         ("--seq-len 200 is longer than the context of model", "use --seq-len 128 or less")),
    Case("model context shorter than eval's perplexity window (eval)", lambda r: ["eval", "--model", str(r / "model"), "--limit", "2"],
         ("the testbed tasks' perplexity window 256 is longer than the context of model", "(128 tokens",
          "pass --allow-long-context to run past it anyway")),
    Case("dense model (run)", lambda r: _run(r, model="dense"),
         ("LlamaForCausalLM has no MoE block", "sparse MoE model")),
    Case("dense model (info)", lambda r: ["info", "--model", str(r / "dense")], ("LlamaForCausalLM has no MoE block",)),
    Case("unsupported model type", lambda r: ["info", "--model", str(r / "future")],
         ("model_type 'moe_from_the_future'", "does not know", "supported MoE checkpoint")),
    Case("unsupported model: encoder-decoder (T5)", lambda r: _run(r, model="t5"),
         ("(t5) is not a causal language model", "decoder-only MoE")),
    Case("plan for another model (prune)", lambda r: ["prune", "--plan", str(r / "runs/base/plan.json"), "--model",
                                                      str(r / "other"), "--out", str(r / "pruned"), "--quiet"],
         ("made for another model", "fingerprint")),
    Case("plan for another model (esap)", lambda r: ["esap", "--model", str(r / "other"), "--plan", str(r / "runs/base/plan.json"),
                                                     "--data", str(r / "data.txt"), *SHORT],
         ("made for another model", "fingerprint")),
    Case("plan with a wrong layer count (prune)", lambda r: ["prune", "--plan", str(r / "two_layers.json"), "--model",
                                                             str(r / "model"), "--out", str(r / "pruned"), "--quiet"],
         ("covers MoE layers [0, 1]", "has MoE layers [0, 1, 2]")),
    Case("plan with a wrong layer count (esap)", lambda r: ["esap", "--model", str(r / "model"), "--plan", str(r / "two_layers.json"),
                                                            "--data", str(r / "data.txt"), *SHORT],
         ("covers MoE layers [0, 1]", "has MoE layers [0, 1, 2]")),
    *(Case(f"hand-written plan: {label} (prune)", lambda r, name=name: ["prune", "--plan", str(r / f"plan_{name}.json"), "--model",
                                                                          str(r / "model"), "--out", str(r / "pruned"), "--quiet"], words)
      for name, label, words in (
          ("no_kept", 'a layer without "kept"', ('layer 1 has no "kept"', 'give every layer "index", "num_experts" and "kept"')),
          ("string_count", '"num_experts" as a string', ('layer 2 "num_experts" is a string "8", not an integer',)),
          ("null_id", '"kept" holding null', ('layer 0 "kept" holds null, not an expert id',)),
          ("no_layers", 'no "layers"', ('has no "layers"', "list every MoE layer")),
          ("below_top_k", "no model_fingerprint, fewer experts than top-k", ("layer 0 keeps 1 experts, fewer than its top-k 2",)),
      )),
    Case("plan whose summary disagrees with its layers (prune)",
         lambda r: ["prune", "--plan", str(r / "stale_counts.json"), "--model", str(r / "model"), "--out", str(r / "pruned"),
                    "--quiet"], ('"counts"', "disagrees with its layers", 'remove "counts"')),
    Case("plan file that is a directory (prune)", lambda r: ["prune", "--plan", str(r / "runs"), "--model",
                                                             str(r / "model"), "--out", str(r / "pruned"), "--quiet"],
         ("cannot read plan file", "runs (Is a directory)", "pass the plan.json written by `allocopt run`")),
    *(Case(f"{what} that is not text", args, words) for what, args, words in (
        ("plan file (prune)", lambda r: ["prune", "--plan", str(r / "binary.json"), "--model", str(r / "model"), "--out",
                                         str(r / "pruned"), "--quiet"],
         ("plan file", "binary.json is not valid JSON (not UTF-8 text, byte 0)", "regenerate it with `allocopt run`")),
        ("plan file cut short (prune)", lambda r: ["prune", "--plan", str(r / "cut_short.json"), "--model",
                                                            str(r / "model"), "--out", str(r / "pruned"), "--quiet"],
         ("cut_short.json is not valid JSON", "at line 1", "regenerate it")),
        ("problem file (run)", lambda r: ["run", "--problem", str(r / "binary.json"), "--out", str(r / "runs/x")],
         ("problem file", "binary.json is not UTF-8 text (byte 0)", "pass a TOML file")),
        ("front file (plot pareto)", lambda r: ["plot", "pareto", str(r / "binary_front" / "front.json"), "--out",
                                                str(r / "plots")],
         ("front.json is not valid JSON (not UTF-8 text, byte 0)", "{counts, esap, memory_bytes}")),
        ("study pointer (plot convergence)", lambda r: ["plot", "convergence", str(r / "binary_run"), "--out",
                                                        str(r / "plots")],
         ("study.json is not valid JSON (not UTF-8 text, byte 0)", '{"storage", "study_name"}')),
    )),
    Case("--out holding the plan being exported (prune)",
         lambda r: ["prune", "--plan", str(r / "runs/base/plan.json"), "--model", str(r / "model"), "--out", str(r / "runs"),
                    "--overwrite", "--quiet"], ("--out", "holds the plan", "pass another --out"), watch=("runs",)),
    Case("corrupted study database", lambda r: _run(r, "--storage", f"sqlite:///{r / 'corrupt.db'}"),
         ("study database", "corrupt.db is corrupt", "restore it"), watch=("corrupt.db",)),
    Case("foreign SQLite file as study database (run)", lambda r: _run(r, "--storage", f"sqlite:///{r / 'foreign.db'}"),
         ("foreign.db is an SQLite database of another program", "users", "not an Optuna study"), watch=("foreign.db",)),
    Case("foreign SQLite file as study database (worker)",
         lambda r: ["worker", "--study", "base", "--storage", f"sqlite:///{r / 'foreign.db'}", "--idle-timeout", "1"],
         ("foreign.db is an SQLite database of another program", "not an Optuna study"), watch=("foreign.db",)),
    Case("unreachable PostgreSQL server", lambda r: _run(r, "--storage", "postgresql://nobody@127.0.0.1:1/nodb"),
         ("cannot connect to study storage postgresql://nobody@127.0.0.1:1/nodb", "check that the server runs")),
    Case("storage URL naming a driver that is not installed",
         lambda r: _run(r, "--storage", "postgresql+pg8000://nobody@127.0.0.1/nodb"),
         ("needs a database driver that is not installed", "pg8000", "allocopt[postgres]")),
    Case("storage URL of a database SQLAlchemy does not know (run)", lambda r: _run(r, "--storage", "foo://bar"),
         ("'foo' is not a database SQLAlchemy knows", "sqlite:///")),
    Case("storage URL of a database SQLAlchemy does not know (worker)",
         lambda r: ["worker", "--study", "base", "--storage", "foo://bar", "--idle-timeout", "1"],
         ("'foo' is not a database SQLAlchemy knows",)),
    Case("--resume of a study that never ran", lambda r: _run(r, "--resume"),
         ("no study 'x'", "x.db does not exist", "drop --resume")),
    Case("worker on a study database that does not exist",
         lambda r: ["worker", "--study", "nope", "--storage", f"sqlite:///{r / 'nothere.db'}", "--idle-timeout", "1"],
         ("no study 'nope'", "nothere.db does not exist", "allocopt run --workers N")),
    Case("worker on a study searched in one process",
         lambda r: ["worker", "--study", "base", "--storage", f"sqlite:///{r / 'runs' / 'base.db'}", "--idle-timeout", "1"],
         ("study 'base' hands out no work", "without --workers", "allocopt run --workers N"), watch=("runs/base.db",)),
    Case("--evals and --generations together", lambda r: _run(r, "--evals", "4", "--generations", "2"),
         ("gives both evals (4) and generations (2)", "give one search budget")),
    *(Case(f"--evals {n} pays for no search ({name})", lambda r, n=n, name=name: _run(r, "--optimizer", name, "--evals", str(n)),
           (f"{name} needs at least 2 evaluations", f"got --evals {n}", "raise --evals"))
      for n, name in ((1, "ga"), (1, "evoesap"), (1, "cmaes"))),
    Case("--tolerance too wide to tell plans apart", lambda r: _run(r, "--tolerance", "5"),
         ("--tolerance 5.0 is not a bound width in [0, 0.1]", "use e.g. 0.0001")),
    Case("--tolerance just above the range (printed as given, not rounded to it)",
         lambda r: _run(r, "--tolerance", "0.10000001"), ("--tolerance 0.10000001 is not a bound width in [0, 0.1]",)),
    Case("tolerance too wide in a problem file (named as the file's, not --tolerance)",
         lambda r: ["run", "--problem", str(r / "wide_tolerance.toml")],
         ("wide_tolerance.toml: tolerance 0.5 is not a bound width in [0, 0.1]",)),
    Case("tolerance too wide in the plan esap --plan rescores (named as the plan file's)",
         lambda r: ["esap", "--model", str(r / "model"), "--plan", str(r / "plan_wide_tolerance.json"),
                    "--data", str(r / "data.txt"), *SHORT],
         ("plan file", "plan_wide_tolerance.json: tolerance 5.0 is not a bound width",)),
    Case("tolerance of the wrong type in the plan esap --plan rescores",
         lambda r: ["esap", "--model", str(r / "model"), "--plan", str(r / "plan_text_tolerance.json"),
                    "--data", str(r / "data.txt"), *SHORT],
         ("plan file", "plan_text_tolerance.json: tolerance must be float, got str 'abc'",)),
    Case("--out holding another run's plan (run)", lambda r: _run(r, out="runs/base"),
         ("holds the plan.json of run 'base'", "this run ('x') would replace", "pass another --out"), watch=("runs/base",)),
    Case("a run its study refuses (another model) leaves the run directory as it was",
         lambda r: [*run_args(r, "base", "--evals", "4", "--population", "4")[:2], str(r / "other"),
                    *run_args(r, "base", "--evals", "4", "--population", "4")[3:]],
         ("study 'base'", "was searched with another model_fingerprint", "pass a new --name"), watch=("runs/base",)),
    Case("esap of an export against another full model (--pruned)",
         lambda r: ["esap", "--model", str(r / "other"), "--pruned", str(r / "export"), "--data", str(r / "data.txt"), *SHORT],
         ("the export", "made for another model", "fingerprint")),
    Case("esap of another tool's export (no plan.json) against a model it was not pruned from (--pruned)",
         lambda r: ["esap", "--model", str(r / "deeper"), "--pruned", str(r / "foreign_export"), "--data",
                    str(r / "data.txt"), *SHORT],
         ("not a pruned copy of the full model", "num_hidden_layers is 3, the full model's 4",
          "the model it was pruned from (--model)")),
    *(Case(f"esap of a checkpoint that cannot be pruned from --model: {label} (--pruned)",
           lambda r, name=name: ["esap", "--model", str(r / "model"), "--pruned", str(r / name), "--data",
                                 str(r / "data.txt"), *SHORT], ("not a pruned copy of the full model", *words))
      for label, name, words in (
          ("more experts per layer", "wider", ("its layer 0 holds 16 routed experts, more than the full model's 8",)),
          ("another family of the same sizes", "alien", ("its model_type is qwen2_moe, the full model's olmoe",)),
          ("an export whose plan.json keeps more than its weights hold", "export_wrong_plan",
           ("its layer 0 holds", "fewer than the 8 its plan keeps", "export its plan again (allocopt prune)")))),
    Case("esap of an export directory that does not exist (--pruned)",
         lambda r: ["esap", "--model", str(r / "model"), "--pruned", str(r / "no_such_export"), "--data",
                    str(r / "data.txt"), *SHORT],
         ("--pruned path", "no_such_export does not exist", "`allocopt prune --out`")),
    Case("esap of an export whose plan.json is not JSON (--pruned)",
         lambda r: ["esap", "--model", str(r / "model"), "--pruned", str(r / "export_corrupt_plan"), "--data",
                    str(r / "data.txt"), *SHORT],
         ("the export", "export_corrupt_plan (its plan.json) is not valid JSON", "allocopt prune",
          "delete", "to score the weights alone")),
    Case("empty calibration data (.txt)", lambda r: _run(r, data="empty.txt"),
         ("empty.txt is empty", "provide calibration/search text")),
    Case("too-short calibration data (.txt)", lambda r: _run(r, data="short.txt"),
         ("short.txt has 3 tokens", "fewer than one window of --seq-len 24")),
    *(Case(f"JSONL line {line}", lambda r, name=name: _run(r, data=f"{name}.jsonl"), (f"{name}.jsonl:2: ", *words))
      for name, line, words in (
          ("null", "null", ("the record is null, not a JSON object", "write one object per line")),
          ("number", "5", ("the record is a number, not a JSON object",)),
          ("text_null", '{"text": null}', ('"text" is null, not a string', 'make "text" a JSON string')),
          ("completion_null", '{"completion": null}', ('"completion" is null, not a string',)),
          ("invalid", '{"text": "a",', ("not valid JSON", "column 14", "write one JSON object per line")),
          ("response_number", '{"prompt": "2+2=", "response": 4}', ('"response" is a number, not a string',)),
          ("prompt_only", '{"prompt": "2+2="}', ('has a "prompt" but no "response" or "completion"', "add the text to score")),
          ("message_without_content", '{"messages": [{"role": "user"}]}',
           ('messages[0] has no "content"', 'give every message a string "content"')),
      )),
    Case("data directory that is not a saved dataset", lambda r: _run(r, data="not_a_dataset"),
         ("not_a_dataset is a directory but not a saved Hugging Face dataset", "dataset_dict.json", "save_to_disk")),
    Case("problem TOML with an unknown key", lambda r: ["run", "--problem", str(r / "unknown_key.toml")],
         ("unknown key 'populaton'", "valid keys are", "population")),
    Case("problem TOML with a wrong type", lambda r: ["run", "--problem", str(r / "wrong_type.toml")],
         ("evals must be int", "got str 'many'")),
    Case("output directory not writable (run)", lambda r: _run(r, out="blocker/run"),
         ("cannot create output directory", "blocker is a file, not a directory"), process=True),
    Case("output directory not writable (observe)",
         lambda r: ["observe", "--model", str(r / "model"), "--data", str(r / "data.txt"), *SHORT, "--no-progress",
                    "--out", str(r / "blocker/stats.safetensors")],
         ("cannot create output directory", "blocker is a file, not a directory")),
    Case("router logits overflow in float16 (run --dtype float16)", lambda r: _run(r, "--dtype", "float16", model="fp16"),
         ("layer 1: router logits are not finite", "float16", "no statistics were saved", "--dtype bfloat16")),
    Case("router logits overflow in float16 (observe --dtype float16)",
         lambda r: ["observe", "--model", str(r / "fp16"), "--data", str(r / "data.txt"), *SHORT, "--no-progress",
                    "--dtype", "float16", "--out", str(r / "stats" / "fp16.safetensors")],
         ("layer 1: router logits are not finite", "float16", "--dtype bfloat16")),
    Case("unknown --dtype", lambda r: _run(r, "--dtype", "float17"),
         ("dtype 'float17' is not a torch floating-point dtype", "bfloat16")),
    Case("disk full while writing plan.json (run)",
         lambda r: [*run_args(r, "full", "--seed", "5"), "--storage", "sqlite:///:memory:"],
         ("could not write", "runs/full/plan.json", "File too large"), process=True, fsize=256, watch=("runs/full",)),
    Case("disk full while writing a pruned checkpoint (prune --overwrite)",
         lambda r: ["prune", "--plan", str(r / "runs/base/plan.json"), "--model", str(r / "model"), "--out", str(r / "export"),
                    "--overwrite", "--quiet"],
         ("could not write", "export", "File too large"), process=True, fsize=64 << 10, watch=("export",)),
]


# ---- the inputs ----------------------------------------------------------------------------------------

def _save_dense(directory: Path, tokenizer_from: Path) -> None:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)


def _save_float16_overflow(directory: Path) -> None:
    """The tiny OLMoE with layer 1's router scaled so its logits are finite in float32/bfloat16, inf in float16."""
    save_tiny_model(directory)
    model = overflow_in_float16(transformers.AutoModelForCausalLM.from_pretrained(directory))
    model.save_pretrained(directory)


def _garble(source: Path, target: Path) -> None:
    """A real study database with pages 2-4 overwritten, as a crash on a broken disk would leave it."""
    data = bytearray(source.read_bytes())
    data[4096:4 * 4096] = bytes((i * 37 + 11) % 256 for i in range(3 * 4096))
    target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("bad_input"))
    save_tiny_model(root / "other", seed=4)
    _save_dense(root / "dense", root / "model")
    _save_float16_overflow(root / "fp16")
    (root / "future").mkdir()
    (root / "future" / "config.json").write_text(json.dumps({"model_type": "moe_from_the_future",
                                                             "architectures": ["FutureMoeForCausalLM"]}))
    (root / "binary.json").write_bytes(bytes(range(255, 0, -1)))           # e.g. a weights file passed by mistake
    (root / "cut_short.json").write_text('{"format": 1, "layers": [')
    for run, name in (("binary_front", "front.json"), ("binary_run", "study.json")):    # a run's file that is not text
        (root / run).mkdir()
        shutil.copy(root / "binary.json", root / run / name)
    transformers.T5Config(vocab_size=256, d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(root / "t5")

    runner = CliRunner()
    base = runner.invoke(cli, run_args(root, "base", "--evals", "4", "--population", "4"))
    assert base.exit_code == 0, base.output
    export = runner.invoke(cli, ["prune", "--plan", str(root / "runs/base/plan.json"), "--out", str(root / "export"), "--quiet"])
    assert export.exit_code == 0, export.output
    shutil.copytree(root / "export", root / "foreign_export")            # as another tool writes it: no plan.json
    (root / "foreign_export" / "plan.json").unlink()
    save_tiny_model(root / "deeper", seed=4, num_hidden_layers=4)
    save_tiny_model(root / "wider", seed=4, num_experts=16)
    save_tiny_model(root / "alien", seed=4, family="qwen2_moe")
    shutil.copytree(root / "export", root / "export_wrong_plan")           # weights of one plan, plan.json of another
    wrong = json.loads((root / "export" / "plan.json").read_text())
    wrong["layers"][0]["kept"] = list(range(wrong["layers"][0]["num_experts"]))
    wrong.pop("counts", None)                                             # its summary would disagree first
    (root / "export_wrong_plan" / "plan.json").write_text(json.dumps(wrong))
    shutil.copytree(root / "export", root / "export_corrupt_plan")         # a plan.json cut short (a full disk)
    text = (root / "export" / "plan.json").read_text()
    (root / "export_corrupt_plan" / "plan.json").write_text(text[: len(text) // 2])
    shutil.copytree(root / "runs" / "base", root / "runs" / "full")      # a finished run the disk-full case reruns
    finished = json.loads((root / "runs" / "full" / "plan.json").read_text())
    (root / "runs" / "full" / "plan.json").write_text(json.dumps({**finished, "run_name": "full"}))

    plan = json.loads((root / "runs/base/plan.json").read_text())
    summary = {k: v for k, v in plan.items() if k != "counts"}        # a user who deletes a layer, not its summary too
    (root / "two_layers.json").write_text(json.dumps({**summary, "layers": plan["layers"][:2]}))
    (root / "stale_counts.json").write_text(json.dumps({**plan, "counts": [c + 1 for c in plan["counts"]]}))
    by_hand = [{"index": l["index"], "num_experts": l["num_experts"], "kept": l["kept"]} for l in plan["layers"]]
    for name, layers in (("no_kept", [by_hand[0], {"index": 1, "num_experts": 8}, by_hand[2]]),
                         ("string_count", [*by_hand[:2], {**by_hand[2], "num_experts": "8"}]),
                         ("null_id", [{**by_hand[0], "kept": [0, None, 3]}, *by_hand[1:]]),
                         ("below_top_k", [{**by_hand[0], "kept": [0]}, *by_hand[1:]])):
        (root / f"plan_{name}.json").write_text(json.dumps({"format": "allocopt.plan/1", "layers": layers}))
    (root / "plan_no_layers.json").write_text(json.dumps({"format": "allocopt.plan/1", "model_fingerprint": plan["model_fingerprint"]}))
    _garble(root / "runs" / "base.db", root / "corrupt.db")
    with sqlite3.connect(root / "foreign.db") as con:
        con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.close()
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("expert 1 takes")
    for name, line in (("null", "null"), ("number", "5"), ("text_null", '{"text": null}'),
                       ("completion_null", '{"completion": null}'), ("invalid", '{"text": "a",'),
                       ("response_number", '{"prompt": "2+2=", "response": 4}'), ("prompt_only", '{"prompt": "2+2="}'),
                       ("message_without_content", '{"messages": [{"role": "user"}]}')):
        (root / f"{name}.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + line + "\n")
    (root / "not_a_dataset").mkdir()
    (root / "not_a_dataset" / "notes.txt").write_text(TEXT)
    (root / "long.toml").write_text(f'model = "{root / "model"}"\ndata = "{root / "data.txt"}"\ncalib_seq_len = 300\n'
                                    f'out = "{root / "runs" / "long"}"\n')
    (root / "unknown_key.toml").write_text("sparsity = 0.5\npopulaton = 8\n")
    (root / "wide_tolerance.toml").write_text(f'model = "{root / "model"}"\ndata = "{root / "data.txt"}"\ntolerance = 0.5\n')
    for name, tolerance in (("wide", 5), ("text", "abc")):
        (root / f"plan_{name}_tolerance.json").write_text(json.dumps({**plan, "tolerance": tolerance}))
    (root / "wrong_type.toml").write_text('evals = "many"\n')
    (root / "blocker").write_text("a regular file where a directory is expected\n")
    return root


# ---- running a case and checking what it left -------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root -> sha256, every directory -> "dir" (so a new, changed or deleted file shows, and so
    does an empty run directory left by a failed command)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _invoke(case: Case, root: Path) -> tuple[int, str, str | None]:
    """(exit code, stderr, uncaught exception as text or None)."""
    args = case.args(root)
    if case.process:
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))) if case.fsize else None
        out = allocopt(*args, preexec_fn=limit)
        return out.returncode, out.stderr, (out.stderr if "Traceback" in out.stderr else None)
    result = CliRunner().invoke(cli, args)
    crash = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crash = "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stderr, crash


ROWS: list[tuple[str, str, int]] = []


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if not ROWS:
        return
    lines = ["| input | message | exit code |", "|---|---|---|"]
    lines += [f"| {label} | {message.replace('|', '/')} | {code} |" for label, message, code in ROWS]
    TABLE.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_bad_input_fails_in_one_line_and_changes_nothing(root, case, record_property):
    before = _snapshot(root)
    code, stderr, crash = _invoke(case, root)
    after = _snapshot(root)
    lines = stderr.strip().splitlines()
    message = lines[-1] if lines else ""
    ROWS.append((case.label, message.replace(str(root), "<tmp>"), code))
    record_property("message", message)
    record_property("exit_code", code)

    assert crash is None, crash
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and message.startswith("error: "), stderr
    missing = [w for w in case.words if w not in message]
    assert not missing, f"{missing} not in {message!r}"
    assert after == before, f"files changed: {sorted(set(before.items()) ^ set(after.items()))}"
    for watched in case.watch:                              # what the case tried to replace is there, whole
        assert (root / watched).exists()
    leftovers = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


# ---- NaN/inf during evaluation: that candidate fails, the search goes on ------------------------------------

def _save_nan_model(directory: Path) -> Path:
    """The tiny OLMoE rigged so the full model is finite but plans that drop expert 2 of layer 0 overflow.

    In layer 0 (attention output zeroed, so each token's hidden state is its own embedding) the router sends
    every token to expert 0 plus expert 1, except the token "wait", which goes to experts 2 and 0. Expert 1
    has a 1e20 weight on a feature only "wait" carries: harmless while "wait" never reaches it, inf/NaN as soon
    as a plan removes expert 2 and "wait" is re-routed to expert 1. Ranked by frequency (0, 1, 2, ...), exactly
    the plans keeping 2 experts in layer 0 fail.
    """
    save_tiny_model(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    [wait] = tokenizer("wait", add_special_tokens=False)["input_ids"]
    layer = model.model.layers[0]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, :2] = 0.0
        embed[:, 0] = 1.0                                  # a constant feature every token has
        embed[wait, 1] = 1.0                               # a feature only "wait" has
        layer.self_attn.o_proj.weight.zero_()
        router = layer.mlp.gate.weight
        router.zero_()
        router[:, 0] = -10.0
        router[0, 0], router[1, 0], router[2, 1] = 10.0, 5.0, 20.0
        layer.mlp.experts.gate_up_proj[1, :, 1] = 1e20
    model.save_pretrained(directory)
    return directory


def test_nan_logits_fail_only_that_candidate_and_the_search_goes_on(tmp_path, record_property):
    _save_nan_model(tmp_path / "model")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    # keep 8 of 24 with >= 2 per layer: 6 plans, 3 of them with 2 experts in layer 0; random tries them all
    args = _run(tmp_path, "--criterion", "frequency", "--sparsity", "0.66", "--optimizer", "random", "--evals", "6",
                "--population", "4")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    study = optuna.load_study(study_name="x", storage=f"sqlite:///{tmp_path / 'runs' / 'x.db'}")
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert failed and complete, [(t.state.name, t.user_attrs["allocation"]) for t in study.trials]
    assert all(t.user_attrs["allocation"][0] == 2 for t in failed)          # exactly the rigged plans fail ...
    assert all(t.user_attrs["allocation"][0] > 2 for t in complete)         # ... and no other
    reasons = {t.user_attrs["fail_reason"] for t in failed}
    assert all(r.startswith("non-finite logits") for r in reasons), reasons
    plan = json.loads((tmp_path / "runs" / "x" / "plan.json").read_text())
    assert plan["counts"][0] > 2 and plan["esap"] == pytest.approx(max(t.value for t in complete))
    assert plan["evaluations"] == len(failed) + len(complete)
    # expert 1 overflows on "wait" in the similarity pass too (never in routing): that token is left out of its pairs
    similarity = RoutingStats.load(tmp_path / "runs" / "x" / "calibration.safetensors").similarity[0]
    assert torch.isfinite(similarity).all() and similarity[1, 0] != 0 and similarity[1, 1] == pytest.approx(1.0, abs=1e-5)
    ROWS.append((f"NaN/inf logits for some plans ({len(failed)} of {len(failed) + len(complete)})",
                 f"no error: those trials FAIL with fail_reason \"{sorted(reasons)[0]}\"; the search finished", 0))
    record_property("nan_trials", f"{len(failed)} FAIL, {len(complete)} COMPLETE; reasons {sorted(reasons)}")


def test_allow_long_context_runs_past_the_context(root, tmp_path):
    """The override is real: rows of 160 tokens through the 128-token tiny model, from the CLI flag and the problem key."""
    observe = CliRunner().invoke(cli, ["observe", "--model", str(root / "model"), "--data", str(root / "data.txt"),
                                       "--seq-len", "160", "--num-seqs", "2", "--no-progress", "--allow-long-context",
                                       "--out", str(tmp_path / "long.safetensors")])
    assert observe.exit_code == 0, observe.output
    assert "observed 320 tokens in 2 rows" in observe.output
    (tmp_path / "long.toml").write_text("allow_long_context = true\nseq_len = 160\n")
    run = CliRunner().invoke(cli, ["run", "--problem", str(tmp_path / "long.toml"), "--model", str(root / "model"),
                                   "--data", str(root / "data.txt"), "--num-seqs", "2", "--calib-num-seqs", "2",
                                   "--optimizer", "uniform", "--quiet", "--out", str(tmp_path / "run"), "--name", "long"])
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["optimizer"] == "uniform"
