"""The full model's next-token distributions, computed once per (model, token set) and kept on the model's device.

Modes:
* ``sparse`` (default for ESAP): per scored position the ids/probs of p above one global threshold plus the
  excluded mass ``tail``. The threshold is the largest one whose *mean* excluded mass is <= ``tolerance``,
  which both certifies the ESAP bound width and spends entries where p is flat (greedy over all entries is
  the smallest cache for a given mean tail). Stored ragged: flat ids/probs + a count per position.
  When p is so flat that the sparse entries would outweigh the full table, the exact table is stored.
* ``exact``: fp32 log-probs of p over the full vocabulary (verification, KL objectives).
* ``targets``: only positions and next tokens (NLL needs no teacher distribution).

The reference kept full-vocab bf16 logits on host and re-uploaded them per candidate (26-80 GB); a sparse
cache at tolerance 1e-4 is typically a few percent of that and never leaves the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors.torch import load_file, save

from allocopt.data.tokens import TokenSet
from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_bytes
from allocopt.objectives.tolerance import check_tolerance

Mode = Literal["sparse", "exact", "targets"]
_BINS_PER_OCTAVE = 8           # threshold resolution: 2^(1/8) steps in p
_NUM_BINS = _BINS_PER_OCTAVE * 160


@dataclass
class TeacherChunk:
    """One micro-batch of rows. ``positions`` index the flattened [b*T] logits of the scored positions."""

    positions: torch.Tensor                  # [n] long
    targets: torch.Tensor                    # [n] long, the token each scored position predicts
    logp: torch.Tensor | None = None         # exact: [n, V] fp32
    counts: torch.Tensor | None = None       # sparse: [n] int32 entries per position
    ids: torch.Tensor | None = None          # sparse: [M] int32
    probs: torch.Tensor | None = None        # sparse: [M] fp32
    tail: torch.Tensor | None = None         # sparse: [n] fp32 mass of p outside ids
    rows: torch.Tensor | None = field(default=None, repr=False)   # derived [M] long, not stored
    p: torch.Tensor | None = field(default=None, repr=False)      # derived exact probabilities [n, V], not stored

    def stored(self) -> dict[str, torch.Tensor]:
        names = ("positions", "targets", "logp", "counts", "ids", "probs", "tail")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def finish(self) -> "TeacherChunk":
        if self.logp is not None:
            self.p = self.logp.exp()
        if self.counts is not None:
            n = self.counts.shape[0]
            self.rows = torch.repeat_interleave(torch.arange(n, device=self.counts.device), self.counts.long())
        return self


@dataclass
class TeacherCache:
    mode: Mode
    tolerance: float
    model_fingerprint: str
    tokens_fingerprint: str
    chunks: list[TeacherChunk]
    batch_size: int

    @property
    def num_scored(self) -> int:
        return sum(int(c.positions.numel()) for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.chunks for t in c.stored().values())

    @property
    def mean_tail(self) -> float:
        """Mean excluded mass of p: the certified width of the pooled ESAP bound (0 for exact)."""
        if self.mode != "sparse":
            return 0.0
        return sum(float(c.tail.double().sum()) for c in self.chunks) / max(self.num_scored, 1)

    @property
    def mean_entries(self) -> float:
        if self.mode != "sparse":
            return 0.0
        return sum(int(c.ids.numel()) for c in self.chunks) / max(self.num_scored, 1)

    def save(self, path: str | Path) -> Path:
        tensors = {f"{i}.{k}": v.contiguous().cpu() for i, c in enumerate(self.chunks) for k, v in c.stored().items()}
        meta = {"mode": self.mode, "tolerance": repr(self.tolerance), "model_fingerprint": self.model_fingerprint,
                "tokens_fingerprint": self.tokens_fingerprint, "chunks": str(len(self.chunks)), "batch_size": str(self.batch_size)}
        return atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "TeacherCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path), device=str(device))
        chunks = [TeacherChunk(**{k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}).finish()
                  for i in range(int(meta["chunks"]))]
        return cls(meta["mode"], float(meta["tolerance"]), meta["model_fingerprint"], meta["tokens_fingerprint"],  # type: ignore[arg-type]
                   chunks, int(meta["batch_size"]))


def scored_positions(batch: TokenSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of scored positions and the next token each predicts (position t -> token t+1)."""
    b, t = batch.input_ids.shape
    score = batch.score_mask.clone()
    score[:, -1] = False                     # nothing to predict after the last column
    pos = score.reshape(-1).nonzero().squeeze(-1)
    targets = batch.input_ids.reshape(-1)[pos + 1]
    return pos, targets


def _bin(p: torch.Tensor) -> torch.Tensor:
    """Bin of each probability on a log2 grid; larger p -> smaller bin. p == 0 lands in the last bin."""
    return (-torch.log2(p) * _BINS_PER_OCTAVE).floor().clamp(0, _NUM_BINS - 1).long()


def build_teacher(logits_fn: Callable[[int, TokenSet], torch.Tensor], batches: list[TokenSet], mode: Mode,
                  tolerance: float, model_fingerprint: str, tokens_fingerprint: str, batch_size: int) -> TeacherCache:
    """``logits_fn(i, batch)`` -> the full model's logits [b, T, V] for micro-batch i. Sparse mode calls it twice
    per batch (one pass to choose the threshold from a mass histogram, one to store), which keeps peak
    memory at one micro-batch of logits instead of the whole set."""
    check_tolerance(tolerance)                          # RunConfig.validate checks it before loading
    located = [scored_positions(b) for b in batches]
    logits_fn = _finite_logits(logits_fn, located)
    cut = _NUM_BINS
    if mode == "sparse":
        mass = torch.zeros(_NUM_BINS, dtype=torch.float64)
        count = torch.zeros(_NUM_BINS, dtype=torch.float64)
        vocab = 0
        for i, (b, (pos, _)) in enumerate(zip(batches, located)):
            p = _probs(logits_fn(i, b), pos)
            vocab = p.shape[-1]
            k = _bin(p).reshape(-1).cpu()
            mass += torch.bincount(k, weights=p.reshape(-1).double().cpu(), minlength=_NUM_BINS)
            count += torch.bincount(k, minlength=_NUM_BINS).double()
        n = sum(int(pos.numel()) for pos, _ in located)
        excluded = mass.flip(0).cumsum(0).flip(0)          # excluded[k] = mass of bins >= k
        ok = (excluded <= tolerance * n * (1 - 1e-3)).nonzero()
        cut = int(ok[0]) if ok.numel() else _NUM_BINS
        if 8 * float(count[:cut].sum()) + 8 * n >= 4 * n * vocab:
            mode = "exact"                                 # p is too flat for a sparse cache to be smaller
    chunks = []
    for i, (b, (pos, targets)) in enumerate(zip(batches, located)):
        chunk = TeacherChunk(positions=pos, targets=targets)
        if mode != "targets":
            logits = logits_fn(i, b)
            if mode == "exact":
                chunk.logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[pos].float(), dim=-1)
            else:
                p = _probs(logits, pos)
                keep = _bin(p) < cut
                chunk.counts = keep.sum(-1, dtype=torch.int32)
                ids = keep.nonzero()[:, 1]
                chunk.ids, chunk.probs = ids.to(torch.int32), p[keep]
                chunk.tail = torch.where(keep, torch.zeros_like(p), p).sum(-1)
        chunks.append(chunk.finish())
    return TeacherCache(mode, float(tolerance), model_fingerprint, tokens_fingerprint, chunks, batch_size)


def _finite_logits(logits_fn: Callable[[int, TokenSet], torch.Tensor], located: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> Callable[[int, TokenSet], torch.Tensor]:
    """``logits_fn`` that refuses inf/NaN teacher logits at scored positions: every plan is compared with them."""
    def checked(i: int, batch: TokenSet) -> torch.Tensor:
        logits = logits_fn(i, batch)
        if not bool(torch.isfinite(logits.reshape(-1, logits.shape[-1])[located[i][0]]).all()):
            dtype = str(logits.dtype).removeprefix("torch.")
            fix = ("float16 overflows here: load the model in bfloat16 or float32 (--dtype bfloat16)" if logits.dtype == torch.float16
                   else "check the checkpoint's weights, or load the model in float32 (--dtype float32)")
            raise AllocoptError(f"the full model's logits are not finite (inf/NaN) in {dtype} on search batch {i}; {fix}")
        return logits
    return checked


def _probs(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.reshape(-1, logits.shape[-1])[pos].float(), dim=-1)
