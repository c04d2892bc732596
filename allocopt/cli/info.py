"""``allocopt info``: describe a model's MoE layers."""
from __future__ import annotations

import json

import click

from allocopt import defaults
from allocopt.cli.options import load_options, loading_options


@click.command("info")
@click.option("--model", "model_spec", default=defaults.MODEL, show_default=True, help="Checkpoint directory or `testbed`.")
@click.option("--json", "as_json", is_flag=True, help="Also print the description as JSON (last line).")
@loading_options
def info(model_spec: str, as_json: bool, **loading) -> None:
    """Describe a model's MoE layers (experts, top-k, shared experts, group-limited routing, the fewest experts the
    router routes with, router rule, storage, size)."""
    from allocopt.models import describe
    from allocopt.runtime import load_model

    model, _ = load_model(model_spec, load_options(loading))
    desc = describe(model)
    click.echo(f"{desc.architecture} ({desc.model_type}), {desc.num_decoder_layers} decoder layers, "
               f"{len(desc.layers)} MoE layers, {desc.dtype}, fingerprint {desc.fingerprint[:12]}")
    width = max(11, *(len(l.router_rule) for l in desc.layers))
    header = (f"{'layer':>5}  {'experts':>7}  {'top-k':>5}  {'shared':>6}  {'groups':>6}  {'min kept':>8}  "
              f"{'router rule':<{width}} {'storage':<10} {'MiB/expert':>10}")
    click.echo(header)
    for l in desc.layers:
        click.echo(f"{l.index:>5}  {l.num_experts:>7}  {l.top_k:>5}  {l.num_shared_experts:>6}  {l.groups:>6}  "
                   f"{max(l.min_kept, l.top_k):>8}  {l.router_rule:<{width}} {l.storage:<10} {l.bytes_per_expert / 2**20:>10.3f}")
    for note in dict.fromkeys(l.routing_note for l in desc.layers if l.routing_note):
        which = [l.index for l in desc.layers if l.routing_note == note]
        click.echo(f"note: {'layer' if len(which) == 1 else 'layers'} {', '.join(map(str, which))}: {note}")
    total_experts = sum(l.num_experts for l in desc.layers)
    click.echo(f"total: {total_experts} routed experts, {desc.expert_bytes / 2**20:.2f} MiB of experts "
               f"of {desc.total_bytes / 2**20:.2f} MiB")
    stored = _stored(model_spec)
    if stored:
        click.echo(f"stored: {stored['stored_bytes'] / 2**20:.2f} MiB of tensors on disk ({stored['stored_format']}); "
                   f"the sizes above are of the weights as loaded, {desc.dtype}")
    if as_json:
        click.echo(json.dumps({**desc.to_json(), **stored}))


def _stored(model_spec: str) -> dict:
    """What a quantized checkpoint (an export with --bits, a block-FP8 source) stores on disk: transformers and
    allocopt load it dequantized, so the loaded sizes are not the ones a server holds. Empty for any other model."""
    from allocopt.export.source_format import source_quantization
    from allocopt.runtime.offload import tensor_bytes

    quantization = source_quantization(model_spec)        # None without a config.json (the testbeds, a hub name)
    if not quantization:
        return {}
    fmt = " ".join(str(quantization[k]) for k in ("quant_method", "format") if quantization.get(k))
    return {"stored_bytes": tensor_bytes(model_spec), "stored_format": fmt}
