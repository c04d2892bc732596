"""Turn a data spec into fixed-shape token windows with an explicit mask of scored positions.

Conventions every consumer relies on:
* rows never cross documents (no packing), so no position attends to another document;
* rows are right-padded; ``attention_mask`` is 1 on real tokens;
* ``score_mask[b, t]`` is True when the distribution at position t (which predicts token t+1) is scored:
  t+1 must be a real token and, for prompt/response data, a response token; for chats, a token of an
  assistant turn (every turn, see :func:`chat_tokens`).

JSONL records are one JSON object per line: ``{"text": ...}``, ``{"prompt": ..., "response"|"completion": ...}``
or ``{"messages": [{"role": ..., "content": ...}, ...]}``. A chat is rendered with the tokenizer's chat template;
a tokenizer without one gets the fallback rendering ``role: content`` per line. A malformed record is refused as
``FILE:LINE: problem; fix``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from allocopt.errors import AllocoptError, json_kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    """A text, optionally split into a prompt (context only) and a response (scored), or a chat.

    A chat (``messages``: role/content pairs) is rendered with the tokenizer's chat template and every assistant
    turn is scored; see :func:`chat_tokens`. ``where`` names the record in error messages (``FILE:LINE``).
    """

    text: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    where: str = ""


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


# Named sources: a spec ``prefix:name`` calls ``fn(name, split) -> list[Document]``. Packages register theirs under
# the entry-point group ``allocopt.data_sources`` (allocopt's own ``testbed`` corpus is one), code at run time with
# register_source; data itself never imports a source.
SOURCE_GROUP = "allocopt.data_sources"
_REGISTERED: dict[str, Callable[[str, str], list[Document]]] = {}


def register_source(prefix: str, fn: Callable[[str, str], list[Document]]) -> None:
    """``fn(name, split)`` for a spec ``prefix:name`` (wins over an entry point of the same prefix)."""
    _REGISTERED[prefix] = fn


def sources() -> dict[str, Callable[[str, str], list[Document]] | EntryPoint]:
    """Every named source: the entry points of ``allocopt.data_sources`` (loaded when used) and registered ones."""
    return {**{ep.name: ep for ep in entry_points(group=SOURCE_GROUP)}, **_REGISTERED}


def _source(prefix: str) -> Callable[[str, str], list[Document]] | None:
    found = sources().get(prefix)
    return found.load() if isinstance(found, EntryPoint) else found


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AllocoptError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line); save the file as UTF-8") from exc
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AllocoptError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line") from exc
        docs.append(_record_to_document(obj, where))
    return docs


_RECORD_FIELDS = 'text, prompt + response (or completion), or messages'


def _record_to_document(obj: object, where: str) -> Document:
    """One record -> Document; anything malformed is refused as ``WHERE: problem; fix``."""
    if not isinstance(obj, dict):
        raise AllocoptError(f"{where}: the record is {json_kind(obj)}, not a JSON object; write one object per line with {_RECORD_FIELDS}")
    for key in ("text", "prompt", "response", "completion"):
        if key in obj and not isinstance(obj[key], str):
            raise AllocoptError(f'{where}: "{key}" is {json_kind(obj[key])}, not a string; make "{key}" a JSON string')
    if "messages" in obj:
        return Document(text="", messages=_messages(obj["messages"], where), where=where)
    answer = next((k for k in ("response", "completion") if k in obj), None)
    if "prompt" in obj:
        if answer is None:
            raise AllocoptError(f'{where}: has a "prompt" but no "response" or "completion"; add the text to score')
        return Document(text=obj[answer], prompt=obj["prompt"], where=where)
    if "text" in obj:
        return Document(text=obj["text"], where=where)
    if answer is not None:
        raise AllocoptError(f'{where}: has a "{answer}" but no "prompt"; add the prompt, or write the whole text as "text"')
    raise AllocoptError(f"{where}: has none of the fields {_RECORD_FIELDS}; use one of them")


def _messages(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        shown = "an empty array" if value == [] else json_kind(value)
        raise AllocoptError(f'{where}: "messages" is {shown}; give a non-empty array of {{"role": ..., "content": ...}} objects')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise AllocoptError(f'{where}: messages[{i}] is {json_kind(m)}, not an object; write {{"role": ..., "content": ...}}')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                problem = f"has no \"{key}\"" if key not in m else f'has "{key}" {json_kind(m[key])}'
                raise AllocoptError(f'{where}: messages[{i}] {problem}; give every message a string "{key}"')
        out.append((m["role"], m["content"]))
    return tuple(out)


# The split names a dataset directory may give calibration and search their own rows with.
DATA_SPLITS = ("calibration", "search")


def _read_hf_dataset(path: Path, split: str) -> list[Document]:
    """Rows of a directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict), chosen by
    :func:`dataset_rows`; one line on the ``allocopt`` logger says which rows ``split`` got."""
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AllocoptError(f"{path}/dataset_dict.json is unreadable ({exc}); save the dataset again with save_to_disk") from exc
        dataset_rows({str(n): 0 for n in names}, split, str(path))         # refuse bad split names before reading rows
    elif not (path / "state.json").is_file():
        raise AllocoptError(f"{path} is a directory but not a saved Hugging Face dataset (no dataset_dict.json or state.json); "
                            "pass a .txt/.jsonl file or a directory written by datasets' save_to_disk")
    try:
        import datasets  # optional dependency: pip install "allocopt[datasets]"
    except ImportError as exc:
        raise AllocoptError(f"{path} is a saved Hugging Face dataset but the `datasets` package is not installed; "
                            'pip install "allocopt[datasets]"') from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise AllocoptError(f"{path} cannot be read as a saved Hugging Face dataset ({exc}); save it again with save_to_disk") from exc
    tables = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"": ds}
    rows, note = dataset_rows({name: len(t) for name, t in tables.items()}, split, str(path))
    log.info(note)
    return [_record_to_document(dict(tables[name][i]), f"{path} [{name or 'rows'}] row {i}") for name, i in rows]


def dataset_rows(sizes: Mapping[str, int], split: str, where: str) -> tuple[list[tuple[str, int]], str]:
    """Which rows (split name, row index) of a dataset directory feed ``split``, and one line that says so.

    * The directory has a split named ``split`` (``calibration`` or ``search``): that split, all of it (other
      splits are not used).
    * It has neither a ``calibration`` nor a ``search`` split (e.g. ``math`` and ``code``, or a single Dataset,
      named ""): every split is used, calibration gets rows 0, 2, 4, ... of each and search rows 1, 3, 5, ...,
      so the two never share a row; the splits are interleaved row by row, so the first rows already mix them.
    * It has only one of the two: refused, since the other would silently reuse or guess rows.
    """
    def listed(names) -> str:
        return ", ".join(f"{n!r} ({sizes[n]} rows)" if n else f"{sizes[n]} rows" for n in names)

    if split in sizes:
        unused = [n for n in sizes if n not in DATA_SPLITS]
        return [(split, i) for i in range(sizes[split])], (f"{where}: {split} data is its split {split!r} ({sizes[split]} rows)"
                                                            + (f"; splits {', '.join(map(repr, unused))} are not used" if unused else ""))
    present = [n for n in DATA_SPLITS if n in sizes]
    if split not in DATA_SPLITS:
        raise AllocoptError(f"{where} has no split {split!r} (it has {', '.join(map(repr, sizes))}); use one of those")
    if present:
        raise AllocoptError(f"{where} has a {present[0]!r} split but no {split!r} split; add a {split!r} split, or remove the "
                            f"{present[0]!r} split so that allocopt divides the rows of all splits between calibration and search")
    parity = DATA_SPLITS.index(split)
    shares = [[(name, i) for i in range(parity, n, 2)] for name, n in sizes.items()]
    rows = [r for group in itertools.zip_longest(*shares) for r in group if r is not None]
    other = DATA_SPLITS[1 - parity]
    share = ("rows 0, 2, 4, ...", "rows 1, 3, 5, ...")
    return rows, (f"{where} has no calibration/search splits, so {split} gets {share[parity]} ({len(rows)} rows) of "
                  f"{listed(sizes)} and {other} gets {share[1 - parity]}")


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


def chat_tokens(tokenizer, messages: Sequence[tuple[str, str]], where: str = "chat") -> tuple[list[int], list[bool]]:
    """Token ids of a chat and, per token, whether it belongs to an assistant turn (the tokens that are scored).

    * The tokenizer has a chat template with ``{% generation %}`` markers: transformers' assistant-token mask.
    * It has another chat template: the chat is rendered whole; assistant turn i spans from where its content starts
      (searched after the rendering of turns < i with the generation prompt, so the "assistant" header is context)
      to the end of the rendering of turns <= i (content and end-of-turn marker, trailing whitespace dropped).
      Those character spans become tokens through the offsets of the whole rendering, so tokens merge exactly as
      the model sees them; a token that straddles a span's edge is scored, since it carries assistant text.
    * It has no chat template (the documented fallback): each message is written ``role: content`` on its own line
      and the content of every assistant message is scored.
    """
    conversation = [{"role": role, "content": content} for role, content in messages]
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        text, spans, at = "", [], 0
        for role, content in messages:
            head = f"{role}: "
            if role == "assistant":
                spans.append((at + len(head), at + len(head) + len(content)))
            text += head + content + "\n"
            at = len(text)
    elif _GENERATION_MARKER.search(str(template)):
        enc = _render(tokenizer, conversation, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
    else:
        text, spans = _template_spans(tokenizer, conversation, where)
    return _tokens_in_spans(tokenizer, text, spans)


_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _render(tokenizer, conversation: list[dict[str, str]], where: str, **kwargs):
    import jinja2

    try:
        return tokenizer.apply_chat_template(conversation, **{"tokenize": False, **kwargs})
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise AllocoptError(f"{where}: the tokenizer's chat template cannot render this chat ({exc}); "
                            "fix the messages (roles and their order) to what the template accepts") from exc


def _template_spans(tokenizer, conversation: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character span of each assistant turn in it (see :func:`chat_tokens`)."""
    full = _render(tokenizer, conversation, where)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, conversation[:i], where, add_generation_prompt=True)
        except AllocoptError:
            if i:
                raise
            before = ""                                   # a template that cannot render an empty chat
        if not full.startswith(before):
            raise AllocoptError(f"{where}: the tokenizer's chat template renders the turns before message {i} differently "
                                f"once message {i} follows, so its tokens cannot be located; mark assistant content with "
                                "{% generation %}...{% endgeneration %} in the template")
        after = _render(tokenizer, conversation[: i + 1], where)
        end = len(os.path.commonprefix([after, full]))   # a template may close the last turn differently
        start, end = len(before), len(before) + len(full[len(before):end].rstrip())
        content = message["content"].strip()
        if content and (at := full.find(content, start, end)) >= 0:
            start = at                                    # the header before the content is context, generation prompt or not
        if end > start:
            spans.append((start, end))
    return full, spans


def _tokens_in_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Ids of ``text`` and whether each token overlaps one of the character ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        scored = [e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), scored
    ids = _encode(tokenizer, text)                      # slow tokenizers have no offsets: count prefix tokens
    scored = [False] * len(ids)
    for a, b in spans:
        lo, hi = len(_encode(tokenizer, text[:a])), len(_encode(tokenizer, text[:b]))
        scored[lo:hi] = [True] * (hi - lo)
    return ids, scored


def documents_to_tokens(docs: Sequence[Document], tokenizer, seq_len: int, num_seqs: int, spec: str) -> TokenSet:
    """Cut documents into windows of at most ``seq_len`` tokens (never crossing documents), right-padded.

    Plain texts and chats fill consecutive windows; a prompt/response pair gives one row, truncated.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows, masks, scores = [], [], []
    for doc in docs:
        if doc.messages:
            ids, scored = chat_tokens(tokenizer, doc.messages, doc.where or spec)
            step = seq_len
        else:
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
    """Load ``num_seqs`` rows of ``seq_len`` tokens from a data spec (see module docstring); data that gives fewer
    rows is used whole, with a note saying so (a plan records the row count asked, not the one scored)."""
    if seq_len < 2 or num_seqs < 1:
        raise AllocoptError(f"seq_len must be >= 2 and num_seqs >= 1 (got {seq_len}, {num_seqs}); raise them")
    tokens = _read_tokens(spec, tokenizer, seq_len, num_seqs, split)
    rows = len(tokens.input_ids)
    if rows < num_seqs:
        log.info(f"{spec} gives {rows} {split} rows of up to {seq_len} tokens, fewer than the {num_seqs} asked; all "
                 f"{rows} are used (more text or a lower row count silences this)")
    return tokens


def _read_tokens(spec: str, tokenizer, seq_len: int, num_seqs: int, split: str) -> TokenSet:
    prefix, _, name = spec.partition(":")
    source = _source(prefix) if name else None
    if source is not None:
        return documents_to_tokens(source(name, split), tokenizer, seq_len, num_seqs, spec)
    path = Path(spec)
    if not path.exists():
        known = ", ".join(f"{p}:NAME" for p in sorted(sources())) or "none (reinstall allocopt: pip install -e .)"
        raise AllocoptError(f"data spec {spec!r} is neither an existing file/directory nor one of the named sources "
                            f"{known}; pass a local .txt/.jsonl file or a named source")
    if path.is_dir():
        docs = _read_hf_dataset(path, split)
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path)
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise AllocoptError(f"{spec}:{line}: not UTF-8 text; save the file as UTF-8") from exc
        if not text.strip():
            raise AllocoptError(f"{spec} is empty; provide calibration/search text")
        return _stream_windows(text, tokenizer, seq_len, num_seqs, spec)
    if not docs:
        raise AllocoptError(f"{spec} contains no documents; provide at least one record")
    return documents_to_tokens(docs, tokenizer, seq_len, num_seqs, spec)
