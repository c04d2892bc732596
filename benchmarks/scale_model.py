"""Random-weight MoE checkpoints with real layer shapes, written one decoder layer at a time (never the whole model).

    python benchmarks/scale_model.py --layers 2 --out /tmp/olmoe-2l       # OLMoE-1B-7B shapes, bf16, 2 layers

Shapes are OLMoE-1B-7B's (hidden 2048, 64 experts of 1024, top-8, vocab 50304, 16 heads); weights are N(0, 0.02)
with N(0, 1) routers, so routing is spread over experts like a trained model's would be; the testbed tokenizer is
saved beside them (its ids are below 50304).

``--layout per-expert`` (the default) stores the tensors under the names ``save_pretrained`` and the published
OLMoE checkpoints use (``mlp.experts.E.gate_proj.weight``: transformers' own reverse of its load-time conversion,
applied a decoder layer at a time); ``--layout fused`` stores transformers' in-memory layout
(``mlp.experts.gate_up_proj``), which loads without conversion.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allocopt.export.streamed import ShardWriter  # noqa: E402

OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                   num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                   tie_word_embeddings=False, norm_topk_prob=False)


LAYOUTS = ("per-expert", "fused")


def write_checkpoint(out: Path, layers: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     shard_bytes: int = 1 << 30, layout: str = "per-expert") -> Path:
    """An OLMoE-shaped checkpoint with ``layers`` decoder layers in ``dtype`` at ``out``, tensors in ``layout``."""
    from transformers.core_model_loading import revert_weight_conversion

    from allocopt import testbed

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")

    config = transformers.OlmoeConfig(**OLMOE_1B_7B, num_hidden_layers=layers, dtype=str(dtype).removeprefix("torch."),
                                      architectures=["OlmoeForCausalLM"])
    with torch.device("meta"):
        skeleton = transformers.OlmoeForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, shard_bytes)
    g = torch.Generator().manual_seed(seed)
    groups: dict[str, dict[str, torch.Tensor]] = {}                  # one group per decoder layer, one for the rest
    for name, p in skeleton.state_dict().items():
        groups.setdefault(".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "", {})[name] = p

    for group in groups.values():
        values = {}
        for name, p in group.items():
            std = 1.0 if name.endswith("mlp.gate.weight") else 0.02
            values[name] = (torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * std).to(dtype)
        if layout == "per-expert":
            values = revert_weight_conversion(skeleton, values)
        for name, value in values.items():
            writer.add(name, value)
        del values
    writer.finish()
    config.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(testbed.path()).save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layout", choices=LAYOUTS, default="per-expert")
    args = parser.parse_args()
    path = write_checkpoint(args.out, args.layers, getattr(torch, args.dtype), layout=args.layout)
    print(f"wrote {path}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB of weights")
