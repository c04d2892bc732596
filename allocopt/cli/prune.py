"""``allocopt prune``: export the pruned checkpoint of a plan."""
from __future__ import annotations

from pathlib import Path

import click

from allocopt.cli.options import load_options, loading_options, quiet_option, silence_progress
from allocopt.errors import AllocoptError


@click.command("prune")
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path), help="plan.json written by `allocopt run`.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Directory for the pruned checkpoint.")
@click.option("--model", "model_spec", default=None, help="Checkpoint directory or `testbed` (default: the plan's \"model\").")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--pad", is_flag=True, help="Pad every layer to the widest kept count with experts that are never chosen, "
                                           "so stock transformers and vLLM load it (exact for routers with a per-expert "
                                           "bias: GPT-OSS, DeepSeek-V3, GLM4-MoE; refused elsewhere).")
@click.option("--count-multiple", type=click.IntRange(min=1), default=None, metavar="M",
              help="Refuse a plan in which a layer keeps a number of experts that is not a multiple of M (the "
                   "server's expert-parallel size, or what its kernel accepts) [default: the plan's own].")
@click.option("--allowed-counts", default=None, metavar="LIST",
              help="Refuse a plan in which a layer keeps a number of experts not in LIST, e.g. 64,96,128 (what the "
                   "server's kernel accepts) [default: the plan's own].")
@quiet_option
@loading_options
def prune(plan_path: Path, out_dir: Path, model_spec: str | None, overwrite: bool, pad: bool, quiet: bool,
          count_multiple: int | None, allowed_counts: str | None, **loading) -> None:
    """Remove the experts a plan prunes and write a loadable checkpoint, plan.json and a model card."""
    from allocopt.models import describe
    from allocopt.runtime import load_model
    from allocopt.export import save_pruned
    from allocopt.export.card import render_card
    from allocopt.export.source_format import refuse_packed_source, source_quantization
    from allocopt.plan import Plan

    if quiet:
        silence_progress()
    plan = Plan.load(plan_path)
    check_out_dir(out_dir, {"the plan": plan_path, "the model": model_spec or plan.extra.get("model")})
    multiple = count_multiple or int(plan.extra.get("count_multiple", 1))
    plan.check_count_multiple(multiple, source=f"plan file {plan_path}")      # before the model loads
    allowed = allowed_counts or plan.extra.get("allowed_counts")
    if allowed:
        plan.check_allowed_counts(allowed, source=f"plan file {plan_path}")
    spec = model_spec or plan.extra.get("model")
    if not spec:
        raise AllocoptError(f"plan file {plan_path} names no model; pass --model PATH")
    refuse_packed_source(source_quantization(spec), spec)
    model, tokenizer = load_model(str(spec), load_options(loading))
    before = describe(model)
    plan.validate_for(before, source=f"plan file {plan_path}")
    compact_bytes = sum(len(lp.kept) * before.bytes_per_expert[lp.index] for lp in plan.layers) + \
        sum(l.num_experts * l.bytes_per_expert for l in before.layers if l.index not in plan.kept)
    save_pruned(model, tokenizer, out_dir, plan, overwrite=overwrite, progress=not quiet, pad=pad,
                card=lambda pruned: render_card(plan, before, pruned, str(spec),
                                                compact_expert_bytes=compact_bytes if pad else None))
    after = describe(model, fingerprint=False)       # streams layer by layer above if the model was offloaded
    sizes = "" if plan.bits else f", {before.total_bytes / 2**20:.1f} MiB -> {after.total_bytes / 2**20:.1f} MiB"   # dense sizes
    click.echo(f"wrote {out_dir}: {sum(len(lp.kept) for lp in plan.layers)}/{sum(before.num_experts.values())} routed "
               f"experts kept{sizes}")
    if plan.bits:
        from allocopt.runtime.offload import tensor_bytes

        widths = ", ".join(f"int{b}" for b in sorted(set(plan.bits.values()), reverse=True))
        on_disk, counted = tensor_bytes(out_dir), plan.extra.get("export_bytes")
        click.echo(f"routed experts of {len(plan.bits)} layers packed at {widths} (compressed-tensors pack-quantized): "
                   f"{on_disk / 2**20:.2f} MiB of tensors on disk")
        if isinstance(counted, int) and counted != on_disk:
            click.echo(f"warning: the plan's export_bytes ({counted}) is not what its export weighs ({on_disk} bytes): "
                       "the plan was edited or made for another checkpoint; its byte budget does not describe this "
                       "export", err=True)
    if pad:
        click.echo(f"padded to {max(after.num_experts.values())} experts per layer: routed experts take "
                   f"{after.expert_bytes / 2**20:.2f} MiB, {after.expert_bytes / compact_bytes:.2f}x the compact export's "
                   f"{compact_bytes / 2**20:.2f} MiB")


def check_out_dir(out_dir: Path, inputs: dict[str, object]) -> None:
    """Refuse an ``--out`` that the export's rename would destroy while it is needed: the directory this process
    runs in (or one above it), or one holding an input (the plan file, the model directory)."""
    out = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(out):
        raise AllocoptError(f"--out {out_dir} is the current directory or one above it, which the export would replace; "
                            "pass a new directory, e.g. --out ./pruned")
    for what, path in inputs.items():
        if path and Path(str(path)).exists() and Path(str(path)).resolve().is_relative_to(out):
            raise AllocoptError(f"--out {out_dir} holds {what} ({path}), which the export would replace; pass another "
                                "--out")
