"""Turn a data spec into fixed-shape token windows with an explicit mask of scored positions.

Conventions every consumer relies on:
* rows never cross documents (no packing), so no position attends to another document;
* rows are right-padded; ``attention_mask`` is 1 on real tokens;
* ``score_mask[b, t]`` is True when the distribution at position t (which predicts token t+1) is scored:
  t+1 must be a real token and, for prompt/response data, a response token.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from allocopt.errors import AllocoptError


@dataclass(frozen=True)
class Document:
    """A text, optionally split into a prompt (context only) and a response (scored)."""

    text: str
    prompt: str = ""


@dataclass
class TokenSet:
    input_ids: torch.Tensor        # [B, T] long
    attention_mask: torch.Tensor   # [B, T] long (1 = real token)
    score_mask: torch.Tensor       # [B, T] bool (position t scores the prediction of token t+1)
    spec: str = ""

    @property
    def num_scored(self) -> int:
        return int(self.score_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.score_mask):
            h.update(t.to(torch.int64).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device: torch.device | str) -> "TokenSet":
        return TokenSet(self.input_ids.to(device), self.attention_mask.to(device), self.score_mask.to(device), self.spec)

    def batches(self, batch_size: int) -> Iterable["TokenSet"]:
        for s in range(0, self.input_ids.shape[0], batch_size):
            yield TokenSet(self.input_ids[s:s + batch_size], self.attention_mask[s:s + batch_size],
                           self.score_mask[s:s + batch_size], self.spec)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# A named source returns documents for (split, seed). ``testbed`` registers itself here.
SOURCES: dict[str, Callable[[str, str], list[Document]]] = {}


def register_source(prefix: str, fn: Callable[[str, str], list[Document]]) -> None:
    """``fn(name, split)`` for a spec ``prefix:name``."""
    SOURCES[prefix] = fn


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AllocoptError(f"{path}:{n} is not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        docs.append(_record_to_document(obj, f"{path}:{n}"))
    return docs


def _record_to_document(obj: dict, where: str) -> Document:
    if "messages" in obj:
        prompt, response = "", ""
        for m in obj["messages"]:
            if m.get("role") == "assistant" and not response:
                response = m.get("content", "")
            elif not response:
                prompt += f"{m.get('role', 'user')}: {m.get('content', '')}\n"
        return Document(text=response, prompt=prompt + "assistant: ")
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        return Document(text=obj.get("response", obj.get("completion", "")), prompt=obj["prompt"])
    if "text" in obj:
        return Document(text=obj["text"])
    raise AllocoptError(f"{where} has none of the fields text, prompt+response, messages; use one of them")


def _read_hf_dataset(path: Path, split: str) -> list[Document]:
    try:
        import datasets  # optional dependency
    except ImportError as exc:
        raise AllocoptError(f"{path} looks like a Hugging Face dataset directory but `datasets` is not installed; pip install datasets") from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split] if split in ds else ds[next(iter(ds))]
    return [_record_to_document(dict(r), f"{path}[{i}]") for i, r in enumerate(ds)]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of a whole text. Texts are cut into windows afterwards, so the tokenizer's "longer than the
    model's maximum length" warning (printed once per call site, for every long document) does not apply."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _stream_windows(text: str, tokenizer, seq_len: int, num_seqs: int, spec: str) -> TokenSet:
    """A plain text file: one token stream, no special tokens, consecutive non-overlapping windows."""
    ids = _encode(tokenizer, text)
    n = len(ids) // seq_len
    if n == 0:
        raise AllocoptError(f"{spec} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; use more text or a shorter --seq-len")
    n = min(n, num_seqs)
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    score = torch.ones_like(x, dtype=torch.bool)
    score[:, -1] = False
    return TokenSet(x, torch.ones_like(x), score, spec)


def documents_to_tokens(docs: Sequence[Document], tokenizer, seq_len: int, num_seqs: int, spec: str) -> TokenSet:
    """Cut documents into windows of at most ``seq_len`` tokens (never crossing documents), right-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows, masks, scores = [], [], []
    for doc in docs:
        p = _encode(tokenizer, doc.prompt) if doc.prompt else []
        r = _encode(tokenizer, doc.text)
        ids, scored = p + r, [False] * len(p) + [True] * len(r)
        step = seq_len if not p else len(ids)       # prompt/response: one row per document, truncated
        for s in range(0, max(len(ids), 1), step):
            w, sw = ids[s:s + seq_len], scored[s:s + seq_len]
            if len(w) < 2:
                continue
            # position t is scored when token t+1 is a scored (response) token
            sm = sw[1:] + [False]
            rows.append(w + [pad] * (seq_len - len(w)))
            masks.append([1] * len(w) + [0] * (seq_len - len(w)))
            scores.append(sm + [False] * (seq_len - len(w)))
            if len(rows) >= num_seqs:
                break
        if len(rows) >= num_seqs:
            break
    if not rows or not any(any(s) for s in scores):
        raise AllocoptError(f"{spec} yields no scorable tokens; provide non-empty documents (at least 2 tokens each)")
    return TokenSet(torch.tensor(rows), torch.tensor(masks), torch.tensor(scores, dtype=torch.bool), spec)


def load_tokens(spec: str, tokenizer, seq_len: int, num_seqs: int, split: str = "search") -> TokenSet:
    """Load ``num_seqs`` rows of ``seq_len`` tokens from a data spec (see module docstring)."""
    if seq_len < 2 or num_seqs < 1:
        raise AllocoptError(f"seq_len must be >= 2 and num_seqs >= 1 (got {seq_len}, {num_seqs}); raise them")
    prefix, _, name = spec.partition(":")
    if name and prefix in SOURCES:
        docs = SOURCES[prefix](name, split)
        return documents_to_tokens(docs, tokenizer, seq_len, num_seqs, spec)
    if prefix == "testbed" and "testbed" not in SOURCES:
        import allocopt.testbed  # noqa: F401  (registers the source)
        return load_tokens(spec, tokenizer, seq_len, num_seqs, split)
    path = Path(spec)
    if not path.exists():
        known = ", ".join(f"{p}:NAME" for p in sorted(SOURCES | {"testbed": None}))
        raise AllocoptError(f"data spec {spec!r} is neither an existing file/directory nor one of {known}; pass a local .txt/.jsonl file or a named source")
    if path.is_dir():
        docs = _read_hf_dataset(path, split)
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path)
    else:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise AllocoptError(f"{spec} is empty; provide calibration/search text")
        return _stream_windows(text, tokenizer, seq_len, num_seqs, spec)
    if not docs:
        raise AllocoptError(f"{spec} contains no documents; provide at least one record")
    return documents_to_tokens(docs, tokenizer, seq_len, num_seqs, spec)
