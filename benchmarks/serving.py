"""Serving pruned testbed exports with vLLM (CPU build): expert weight bytes and decode tokens/s, measured in one run.

Rows: the full testbed; a uniform and a non-uniform (GA-searched) plan at the same budget, each as the compact export
(non-uniform: served through allocopt's vLLM plugin) and padded to its widest layer. The testbed is OLMoE, whose
router has no per-expert bias, so `allocopt prune --pad` refuses it (padding is not exact there); the padded rows are
built with ``pad_model(check_exact=False)`` only to measure what padding costs in memory and speed. Ratios are
against the full model in the same run. Needs the vLLM environment (``bash .ci/vllm-venv``).

    python benchmarks/serving.py [--out DIR] [--vllm-python .venv-vllm/bin/python] [--json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.evaluation import tasks
from allocopt.runtime import load_model
from allocopt.export import save_pruned
from allocopt.plan import Plan
from allocopt.export.padded import pad_model
from allocopt.serving.vllm_engine import run_in

REPO = Path(__file__).resolve().parents[1]
SEARCH = ["--criterion", "reap", "--sparsity", "0.5", "--seq-len", "64", "--num-seqs", "4", "--calib-num-seqs", "8",
          "--evals", "24", "--population", "8", "--quiet"]


def _plan(root: Path, optimizer: str) -> Plan:
    run_dir = root / "runs" / optimizer
    result = CliRunner().invoke(cli, ["run", "--optimizer", optimizer, *SEARCH, "--out", str(run_dir),
                                      "--name", f"serving-{optimizer}"])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return Plan.load(run_dir / "plan.json")


def _export(root: Path, name: str, plan: Plan, padded: bool) -> Path:
    model, tokenizer = load_model("testbed")
    if padded:
        pad_model(model, plan.kept, check_exact=False)      # cost measurement only: OLMoE padding is not exact
    save_pruned(model, tokenizer, root / "exports" / name, plan, pad=padded, overwrite=True)
    return root / "exports" / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="Work directory (default: a temporary one).")
    ap.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="serving-bench-"))
    root.mkdir(parents=True, exist_ok=True)

    uniform, searched = _plan(root, "uniform"), _plan(root, "ga")
    assert sum(uniform.counts) == sum(searched.counts), "plans must have the same budget"
    rows = [("full testbed", REPO / "allocopt" / "testbed" / "checkpoint", None),
            ("uniform, compact", _export(root, "uniform", uniform, False), uniform),
            ("non-uniform, compact (plugin)", _export(root, "searched", searched, False), searched),
            ("non-uniform, padded*", _export(root, "searched-padded", searched, True), searched)]
    _, tokenizer = load_model("testbed")
    prompts = [tokenizer(i["prompt"], add_special_tokens=False)["input_ids"] for i in tasks.code_items()[:args.prompts]]
    results = []
    for name, path, plan in rows:
        got = run_in(args.vllm_python, path, {"prompts": prompts, "max_new_tokens": args.new_tokens,
                                              "decode_benchmark": True}, root, {"VLLM_LOGGING_LEVEL": "WARNING"})
        results.append({"name": name, "counts": plan.counts if plan else got["experts_per_layer"],
                        "vllm_experts_per_layer": got["experts_per_layer"], "expert_bytes": got["expert_bytes"],
                        "decode_tokens_per_second": got["decode_tokens_per_second"], "model_class": got["model_class"],
                        "vllm": got["vllm_version"]})
    full = results[0]
    print(f"vLLM {full['vllm']} (CPU), {args.prompts} prompts x {args.new_tokens} new tokens, greedy; "
          f"sparsity 0.5 (kept {sum(uniform.counts)}/{sum(full['counts'])} routed experts)")
    print(f"{'export':<32} {'experts per layer in vLLM':<28} {'expert MB':>9} {'x full':>7} {'decode tok/s':>13} {'x full':>7}")
    for r in results:
        print(f"{r['name']:<32} {str(r['vllm_experts_per_layer']):<28} {r['expert_bytes'] / 2**20:>9.2f} "
              f"{r['expert_bytes'] / full['expert_bytes']:>7.2f} {r['decode_tokens_per_second']:>13.1f} "
              f"{r['decode_tokens_per_second'] / full['decode_tokens_per_second']:>7.2f}")
    print("* padded to the widest layer with never-used zero experts: a cost measurement; `allocopt prune --pad` "
          "refuses OLMoE because its softmax router cannot make padding exact.")
    print(f"served by: {sorted({r['model_class'] for r in results})}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
