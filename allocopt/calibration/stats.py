"""Per-expert routing statistics: the one record every criterion reads, stored as a single safetensors file.

Why these accumulators: every member of the unified criterion family S(b, alpha, beta) (related-work §3)
with alpha, beta in the supported set is a ratio of two of them, so criteria never need another forward pass.
Sums are float64 so millions of tokens add up without drift. A file never holds inf/NaN: ``save`` and ``load``
refuse them, since a criterion would rank such experts arbitrarily (NaN sorts last).

    stats = observe(model, tokens)          # allocopt.calibration.observer
    stats.save("stats.safetensors")
    stats = RoutingStats.load("stats.safetensors")
    stats.count[layer]                      # float64 [E]: routed tokens per expert
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_bytes

FORMAT = "allocopt.stats/1"
_META_KEY = "allocopt"

# name -> what is summed over the tokens routed to an expert (g: gate weight applied by the model,
# f: the expert's unweighted output vector). ``max_act`` is a maximum, not a sum.
ACCUMULATORS: dict[str, str] = {
    "count": "n = number of routed (token, slot) pairs",
    "gate_sum": "sum g",
    "norm_sum": "sum ||f||",
    "gate_norm_sum": "sum g*||f||",
    "sq_norm_sum": "sum ||f||^2",
    "gate2_sq_norm_sum": "sum g^2*||f||^2",
    "max_act": "max |f_i| over routed tokens",
}


@dataclass
class RoutingStats:
    """Accumulated routing statistics of one model on one calibration set.

    ``layers`` are decoder-layer indices of the MoE layers; every accumulator is a dict layer -> float64 [E];
    ``similarity`` is layer -> float32 [E, E], the mean cosine similarity of two experts' outputs on the
    same sampled tokens (see allocopt.calibration.observer).
    """

    model_fingerprint: str
    data_fingerprint: str
    num_tokens: int
    layers: list[int]
    count: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    norm_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_norm_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    sq_norm_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    gate2_sq_norm_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    max_act: dict[int, torch.Tensor] = field(default_factory=dict)
    similarity: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, model_fingerprint: str, data_fingerprint: str, num_experts: dict[int, int]) -> "RoutingStats":
        """Zeroed accumulators for layers ``{decoder-layer index: number of experts}``."""
        stats = cls(model_fingerprint, data_fingerprint, 0, sorted(num_experts))
        for layer, e in num_experts.items():
            for name in ACCUMULATORS:
                getattr(stats, name)[layer] = torch.zeros(e, dtype=torch.float64)
            stats.similarity[layer] = torch.zeros(e, e, dtype=torch.float32)
        return stats

    def num_experts(self, layer: int) -> int:
        return int(self.count[layer].shape[0])

    def accumulator(self, name: str) -> dict[int, torch.Tensor]:
        if name not in ACCUMULATORS:
            raise AllocoptError(f"unknown statistic {name!r}; use one of {', '.join(ACCUMULATORS)}")
        return getattr(self, name)

    def nonfinite(self) -> list[str]:
        """Names (``layer.L.name``) of the tensors holding inf or NaN."""
        return [key for key, t in self._tensors().items() if not bool(torch.isfinite(t).all())]

    def check_finite(self, source: str) -> None:
        """Raise AllocoptError naming the first tensor with inf/NaN in it."""
        bad = self.nonfinite()
        if bad:
            more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
            raise AllocoptError(f"{source}: non-finite values (inf/NaN) in {bad[0]}{more}; re-run `allocopt observe` "
                                "with the model in bfloat16 or float32 (--dtype bfloat16)")

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.layers:
            for name in (*ACCUMULATORS, "similarity"):
                out[f"layer.{layer}.{name}"] = getattr(self, name)[layer].contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .safetensors file atomically; the metadata JSON sits in the safetensors header."""
        self.check_finite(f"statistics to save as {path}")
        meta = {
            "format": FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "num_tokens": int(self.num_tokens),
            "layers": [int(i) for i in self.layers],
            "accumulators": ACCUMULATORS,
            "similarity": "mean cosine similarity of expert outputs on sampled tokens, float32 [E, E]",
        }
        data = save_safetensors(self._tensors(), metadata={_META_KEY: json.dumps(meta)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingStats":
        """Read a file written by :meth:`save`; anything else raises AllocoptError."""
        path = Path(path)
        if not path.is_file():
            raise AllocoptError(f"statistics file {path} does not exist; run `allocopt observe --out {path}` first")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise AllocoptError(f"{path} is not a readable safetensors file ({exc}); re-run `allocopt observe`") from exc
        try:
            meta = json.loads(header[_META_KEY])
        except (KeyError, json.JSONDecodeError) as exc:
            raise AllocoptError(f"{path} is not an allocopt statistics file; pass a file written by `allocopt observe`") from exc
        if meta.get("format") != FORMAT:
            raise AllocoptError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; re-run `allocopt observe` with this allocopt version")
        stats = cls(meta["model_fingerprint"], meta["data_fingerprint"], int(meta["num_tokens"]), [int(i) for i in meta["layers"]])
        for layer in stats.layers:
            for name in (*ACCUMULATORS, "similarity"):
                key = f"layer.{layer}.{name}"
                if key not in tensors:
                    raise AllocoptError(f"{path} lacks tensor {key}; the file is incomplete, re-run `allocopt observe`")
                getattr(stats, name)[layer] = tensors[key]
        stats.check_finite(f"statistics file {path}")
        return stats
