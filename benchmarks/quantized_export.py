"""One quantized plan end to end (issue #23): search with --bits, export, and what loads the export.

    python benchmarks/quantized_export.py                        # testbed, reap, --memory-ratio 0.4, 300 evaluations
    python benchmarks/quantized_export.py --evals 60 --out /tmp/qe

Runs ``allocopt run --bits 8,4 --memory-ratio R`` on the testbed, ``allocopt prune`` of its plan, then reports:
the export's tensor bytes on disk against plan.json's ``export_bytes`` and the budget; the max |logit diff| between
the export loaded by allocopt (``load_model``) and the scored model (the full model under the plan's masking and
quantization) on 4 x 128 held-out tokens, and of the export loaded by plain transformers with its own modelling code
(``trust_remote_code=True``); whether stock transformers ``from_pretrained`` loads it without that code (and the first
line of its error where not); and, where the vLLM side environment exists (``.ci/vllm-venv``), whether vLLM serves
it (the engine's error line where not). Writes ``quantized_export.md``/``.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_CODE = """
import sys
def main():
    from vllm import LLM, SamplingParams
    try:
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=2,
                  gpu_memory_utilization=0.1)
        out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(max_tokens=4, temperature=0))
        print("SERVED", list(out[0].outputs[0].token_ids))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, str(exc).splitlines()[0][:300])
if __name__ == "__main__":
    main()
"""


def main(argv: list[str] | None = None) -> int:
    import torch
    from click.testing import CliRunner

    from allocopt.cli.main import cli
    from allocopt.data import load_tokens
    from allocopt.io import atomic_write_json, atomic_write_text
    from allocopt.models.quantization import apply_plan
    from allocopt.plan import Plan
    from allocopt.runtime import load_model
    from allocopt.runtime.offload import tensor_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--evals", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "studies" / "reports"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = out / "quantized_export"
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / ".gitignore", "*\n")
    runner = CliRunner()
    start = time.perf_counter()
    run = runner.invoke(cli, ["run", "--bits", "8,4", "--memory-ratio", str(args.ratio), "--evals", str(args.evals),
                              "--out", str(work / f"run-r{args.ratio:g}"), "--name", f"quantized-export-r{args.ratio:g}", "--quiet", "--json"])
    if run.exit_code:
        print(run.output)
        return 1
    plan_path = work / f"run-r{args.ratio:g}" / "plan.json"
    plan = Plan.load(plan_path)
    export = work / "export"
    done = runner.invoke(cli, ["prune", "--plan", str(plan_path), "--out", str(export), "--overwrite", "--quiet"])
    if done.exit_code:
        print(done.output)
        return 1
    full, tokenizer = load_model("testbed")
    rows = load_tokens("testbed:mix", tokenizer, 128, 4, split="heldout").input_ids
    with torch.no_grad(), apply_plan(full, plan):
        scored = full(rows).logits
    loaded, _ = load_model(str(export))
    with torch.no_grad():
        diff = float((loaded(rows).logits - scored).abs().max())
    import transformers

    try:
        transformers.AutoModelForCausalLM.from_pretrained(export)
        stock = "loads"
    except Exception as exc:                                           # what stock transformers says, reported
        stock = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    remote = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    with torch.no_grad():
        remote_diff = float((remote(rows).logits - scored).abs().max())
    if VLLM_PYTHON.is_file():
        served = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_CODE, str(export)], capture_output=True, text=True,
                                timeout=900, env={"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
                                                  "PATH": "/usr/bin:/bin"})
        line = next((l for l in served.stdout.splitlines() if l.startswith(("SERVED", "REFUSED"))), None)
        causes = [l.split("] ")[-1] for l in (served.stdout + served.stderr).splitlines()
                  if "Error:" in l and "Engine core initialization failed" not in l]
        if line and line.startswith("REFUSED") and causes:        # the engine's worker says why; the client does not
            line = f"REFUSED {causes[-1][:300]}"
        vllm = line or f"no result (exit {served.returncode}): {(served.stderr.strip().splitlines() or [''])[-1][:200]}"
        version = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                 text=True).stdout.strip()
        vllm = f"vLLM {version} (CPU): {vllm}"
    else:
        vllm = "not run: no .venv-vllm here (bash .ci/vllm-venv makes it)"
    on_disk = tensor_bytes(export)
    report = {"command": "python benchmarks/quantized_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "compressed-tensors": __import__("importlib.metadata").metadata.version("compressed-tensors")},
              "plan": {"counts": plan.counts, "bits": [lp.bits for lp in plan.layers], "esap": plan.extra["esap"],
                       "uniform_esap": plan.extra["uniform_esap"]},
              "budget_bytes": plan.extra["memory_budget_bytes"], "export_bytes_counted": plan.extra["export_bytes"],
              "bytes_on_disk": on_disk, "full_export_bytes": plan.extra["full_export_bytes"],
              "max_abs_logit_diff": diff, "allocopt_load_model": "loads", "stock_transformers": stock,
              "remote_code": {"class": type(remote).__name__, "max_abs_logit_diff": remote_diff}, "vllm": vllm,
              "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "quantized_export.json", report)
    md = ["# One quantized plan, exported (benchmarks/quantized_export.py)", "",
          f"`{report['command']}`; {report['versions']}; {report['seconds']:.0f} s.", "",
          "| what | value |", "|---|---|",
          f"| plan (counts; bits per layer, None = fp32) | {plan.counts}; {report['plan']['bits']} |",
          f"| ESAP (search set): plan / best uniform-both | {report['plan']['esap']:.5f} / {report['plan']['uniform_esap']:.5f} |",
          f"| budget / counted / on disk (tensor bytes) | {report['budget_bytes']:,} / {report['export_bytes_counted']:,} / "
          f"{on_disk:,} (unpruned fp32 export {report['full_export_bytes']:,}) |",
          f"| max abs logit diff, export (allocopt load_model) vs scored model, 4 x 128 held-out tokens | {diff:.2e} |",
          f"| plain transformers, `trust_remote_code=True` (the export's modeling_allocopt.py, {type(remote).__name__}): "
          f"max abs logit diff | {remote_diff:.2e} |",
          f"| stock transformers `from_pretrained` (no remote code) | {stock} |",
          f"| vLLM | {vllm} |", ""]
    atomic_write_text(out / "quantized_export.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
