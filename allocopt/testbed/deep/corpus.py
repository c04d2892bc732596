"""The deep testbed's offline corpus: more and more varied text than the first testbed's, splits shipped as files.

* ``code``: Python source of the standard library and of installed pure-Python packages (``PACKAGES``);
* ``prose``: pydoc's help topics, the long descriptions of installed distributions (their METADATA; allocopt's own,
  which changes with its README, left out) and the module docstrings of the standard library;
* ``math``: worksheets of multi-step word problems mixed with arithmetic lines (``problems.py``).

Every document lands in one split by a hash of its identity (``testbed.corpus.split_of``), so held-out text never
appears in training. The calibration, search and held-out splits are shipped in ``splits/SPLIT.jsonl.gz``, written
once by ``python -m allocopt.testbed.deep.corpus``, so every machine scores the same text whatever its Python version.
The training split is read from this machine's files, restricted to the documents ``splits/train_manifest.json.gz``
lists (identity and sha256 of its text, written with the splits): a machine with other distributions installed reads
the same documents, and :func:`check_train_corpus` (run by the training recipe) refuses a machine whose files differ
from the manifest, naming what differs and the versions that wrote it, so a retrain reads exactly the pinned text.
"""
from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import importlib.metadata
import json
import random
import sysconfig
from pathlib import Path

from allocopt.data.tokens import Document
from allocopt.errors import AllocoptError
from allocopt.testbed.corpus import split_of
from allocopt.testbed.deep import problems

DOMAINS = ("code", "prose", "math", "mix")
SPLITS = ("train", "calibration", "search", "heldout")
PACKAGES = ("click", "optuna", "pymoo", "tqdm", "packaging", "jinja2", "yaml", "sqlalchemy", "alembic", "colorlog",
            "accelerate", "safetensors", "huggingface_hub", "filelock", "fsspec", "requests")
SPLITS_DIR = Path(__file__).resolve().parent / "splits"
MANIFEST = SPLITS_DIR / "train_manifest.json.gz"
SHIPPED_CHARS = {"code": 400_000, "prose": 250_000, "math": 150_000}     # per domain and split, shipped
MATH_DOCS = {"calibration": 64, "search": 64, "heldout": 96}
WORKSHEET_LINES = 20
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo", "testing"}


def _check(domain: str, split: str) -> None:
    if domain not in DOMAINS:
        raise AllocoptError(f"unknown deep-testbed domain {domain!r}; use one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise AllocoptError(f"unknown deep-testbed split {split!r}; use one of {', '.join(SPLITS)}")


def _python_files(root: Path, label: str) -> list[tuple[str, Path]]:
    return [(f"{label}/{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*.py"))
            if not any(part in _EXCLUDED_DIRS or part.startswith("test") for part in p.relative_to(root).parts)]


def _code_sources() -> list[tuple[str, Path]]:
    files = _python_files(Path(sysconfig.get_paths()["stdlib"]), "stdlib")
    files = [(k, p) for k, p in files if "site-packages" not in k]
    for name in PACKAGES:
        root = _find(name)
        if root is not None:
            files += _python_files(root, name)
    return files


def _find(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _prose_sources() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    out = [(f"topic/{k}", topics[k].strip()) for k in sorted(topics) if topics[k].strip()]
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        if (dist.metadata["Name"] or "").lower() == "allocopt":     # its own README: changes with every edit
            continue
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        body = body or dist.metadata.get("Description") or ""
        if len(body.strip()) > 200:
            out.append((f"metadata/{dist.metadata['Name']}", body.strip()))
    for key, path in _python_files(Path(sysconfig.get_paths()["stdlib"]), "stdlib"):
        try:
            doc = ast.get_docstring(ast.parse(_read(path)))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) > 200:
            out.append((f"docstring/{key}", doc.strip()))
    return out


form_of = problems.form_of          # the math tasks' per-form scores (``evaluation.tasks.math_items``)


def math_worksheet(rng: random.Random, split: str, lines: int = WORKSHEET_LINES) -> Document:
    """``lines`` problems of ``split``, one ``question=answer`` per line."""
    inside = lambda q: split_of("deep-math:" + q) == split      # noqa: E731
    return Document(text="\n".join(f"{q}={a}" for _, q, a in (problems.problem(rng, inside) for _ in range(lines))))


def _build(domain: str, split: str) -> tuple[Document, ...]:
    """From this machine's files and generator (the training split, and the source of the shipped files)."""
    if domain == "math":
        rng = random.Random(f"deep-math-{split}")
        return tuple(math_worksheet(rng, split) for _ in range(MATH_DOCS.get(split, 0)))
    return tuple(Document(text=t) for k, t in _items(domain) if t and split_of(f"deep-{domain}:{k}") == split)


@functools.lru_cache(maxsize=None)
def _items(domain: str) -> tuple[tuple[str, str], ...]:
    """``(identity, text)`` of every code or prose document on this machine, read once for all splits."""
    return tuple((k, _read(p)) for k, p in _code_sources()) if domain == "code" else tuple(_prose_sources())


@functools.lru_cache(maxsize=None)
def _shipped(split: str) -> dict[str, tuple[Document, ...]]:
    path = SPLITS_DIR / f"{split}.jsonl.gz"
    if not path.is_file():
        raise AllocoptError(f"the deep testbed's {split} split {path} is missing; reinstall allocopt (or write it with "
                            "`python -m allocopt.testbed.deep.corpus`)")
    out: dict[str, list[Document]] = {d: [] for d in ("code", "prose", "math")}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out[row["domain"]].append(Document(text=row["text"]))
    return {d: tuple(v) for d, v in out.items()}


@functools.lru_cache(maxsize=None)
def _train(domain: str) -> tuple[Document, ...]:
    """The training documents: the manifest's, in its order, where it lists the domain (else all of this machine's)."""
    listed = _manifest().get("documents", {}).get(domain)
    if listed is None or domain == "math":
        return _build(domain, "train")
    here = dict(_items(domain))
    return tuple(Document(text=here[k]) for k, _ in listed if k in here)


@functools.lru_cache(maxsize=None)
def _manifest() -> dict:
    if not MANIFEST.is_file():
        return {}
    with gzip.open(MANIFEST, "rt", encoding="utf-8") as f:
        return json.load(f)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_train_corpus() -> None:
    """Refuse (one line) a machine whose training documents differ from the manifest: missing or changed texts mean
    another training text than the one the shipped model's recipe pins. Nothing to check without a manifest."""
    manifest = _manifest()
    bad: list[str] = []
    total = 0
    for domain, listed in manifest.get("documents", {}).items():
        here = dict(_items(domain))
        total += len(listed)
        bad += [k for k, digest in listed if k not in here or _sha(here[k]) != digest]
    if bad:
        versions = ", ".join(f"{k} {v}" for k, v in manifest.get("sources", {}).items())
        raise AllocoptError(f"{len(bad)} of {total} training documents of the deep testbed are missing or differ on this "
                            f"machine (e.g. {bad[0]}); install what the manifest was written with ({versions}) to "
                            "train the pinned text")


def write_manifest(path: Path = MANIFEST) -> int:
    """Write the training manifest from this machine's files; returns the documents it lists."""
    docs = {d: [(k, _sha(t)) for k, t in _items(d) if t and split_of(f"deep-{d}:{k}") == "train"] for d in ("code", "prose")}
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump({"sources": source_versions(), "documents": docs}, f)
    _manifest.cache_clear()
    _train.cache_clear()
    return sum(len(v) for v in docs.values())


def documents(domain: str, split: str) -> list[Document]:
    """The documents of one domain and split, in a fixed order. ``mix`` interleaves code, prose and math."""
    _check(domain, split)
    if domain == "mix":
        parts = [documents(d, split) for d in ("code", "prose", "math")]
        return [p[i] for i in range(max(len(p) for p in parts)) for p in parts if i < len(p)]
    return list(_train(domain) if split == "train" else _shipped(split)[domain])


def source_versions() -> dict[str, str]:
    """Python and each installed package the training split reads (its text changes with them)."""
    import platform

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version({"yaml": "PyYAML"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def source(name: str, split: str) -> list[Document]:
    """The ``deep:NAME`` data source (entry point ``deep`` of the group ``allocopt.data_sources``)."""
    return documents(name, split)


def write_splits(directory: Path = SPLITS_DIR) -> dict[str, dict[str, int]]:
    """Write the shipped splits from this machine's files: documents in a fixed order, each domain capped at
    ``SHIPPED_CHARS`` characters per split (whole documents, the longest cut). Returns characters per split/domain."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, dict[str, int]] = {}
    for split in SPLITS[1:]:
        rows, sizes[split] = [], {}
        for domain in ("code", "prose", "math"):
            used = 0
            for doc in _build(domain, split):
                if used >= SHIPPED_CHARS[domain]:
                    break
                text = doc.text[: SHIPPED_CHARS[domain] - used]
                rows.append({"domain": domain, "text": text})
                used += len(text)
            sizes[split][domain] = used
        with gzip.open(directory / f"{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return sizes


if __name__ == "__main__":
    print(json.dumps(write_splits(), indent=1))
    print(f"training manifest: {write_manifest()} documents")
