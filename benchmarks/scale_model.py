"""Random-weight MoE checkpoints with real layer shapes, written tensor by tensor (never the whole model in memory).

    python benchmarks/scale_model.py --layers 2 --out /tmp/olmoe-2l       # OLMoE-1B-7B shapes, bf16, 2 layers

Shapes are OLMoE-1B-7B's (hidden 2048, 64 experts of 1024, top-8, vocab 50304, 16 heads); weights are N(0, 0.02)
with N(0, 1) routers, so routing is spread over experts like a trained model's would be; the testbed tokenizer is
saved beside them (its ids are below 50304).
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


def write_checkpoint(out: Path, layers: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     shard_bytes: int = 1 << 30) -> Path:
    """An OLMoE-shaped checkpoint with ``layers`` decoder layers in ``dtype`` at ``out``."""
    from allocopt import testbed

    config = transformers.OlmoeConfig(**OLMOE_1B_7B, num_hidden_layers=layers, dtype=str(dtype).removeprefix("torch."),
                                      architectures=["OlmoeForCausalLM"])
    with torch.device("meta"):
        skeleton = transformers.OlmoeForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, shard_bytes)
    g = torch.Generator().manual_seed(seed)
    for name, p in skeleton.state_dict().items():
        std = 1.0 if name.endswith("mlp.gate.weight") else 0.02
        value = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * std
        writer.add(name, value.to(dtype))
        del value
    writer.finish()
    config.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(testbed.path()).save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    path = write_checkpoint(args.out, args.layers, getattr(torch, args.dtype))
    print(f"wrote {path}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB of weights")
