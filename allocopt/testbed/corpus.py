"""The testbed's offline corpus: three domains built from what every Python install already has.

* ``code``: Python standard-library source files (one document per file);
* ``prose``: the English help topics of ``pydoc_data.topics`` (one document per topic);
* ``math``: generated arithmetic worksheets, one ``37+45=82`` problem per line.

Every document lands in one split by a hash of its identity (file path, topic key, or the problem itself), so
the splits never change when files are added elsewhere and no held-out problem can ever appear in training.
"""
from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from pathlib import Path
from typing import Callable

from allocopt.data.tokens import Document
from allocopt.errors import AllocoptError

DOMAINS = ("code", "prose", "math", "mix")
SPLITS = ("train", "calibration", "search", "heldout")

# Percent buckets of a stable hash: 85% train, 5% for each of the other splits. Prose has only ~80 topics, so it
# gives 10% to each non-training split to leave a few documents in every split.
_BUCKETS = {"train": range(0, 85), "calibration": range(85, 90), "search": range(90, 95), "heldout": range(95, 100)}
_PROSE_BUCKETS = {"train": range(0, 70), "calibration": range(70, 80), "search": range(80, 90), "heldout": range(90, 100)}
# Generated math: worksheets per split (training draws its own stream through ``math_worksheet``).
MATH_DOCS = {"train": 4000, "calibration": 64, "search": 64, "heldout": 64}
WORKSHEET_LINES = 30
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo"}


def split_of(key: str, buckets: dict[str, range] = _BUCKETS) -> str:
    """The split a document or problem belongs to, from a hash of its identity (stable across runs)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return next(s for s, r in buckets.items() if bucket in r)


def _check(domain: str, split: str) -> None:
    if domain not in DOMAINS:
        raise AllocoptError(f"unknown testbed domain {domain!r}; use one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise AllocoptError(f"unknown testbed split {split!r}; use one of {', '.join(SPLITS)}")


# ---- code ------------------------------------------------------------------------------------------------------

def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS or part.startswith("test") for part in rel.parts):
            continue
        files.append(path)
    return files


@functools.lru_cache(maxsize=None)
def _code(split: str) -> tuple[Document, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _stdlib_files():
        rel = path.relative_to(root).as_posix()
        if split_of("code:" + rel) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(Document(text=text))
    return tuple(docs)


# ---- prose -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _prose(split: str) -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    return tuple(Document(text=topics[key].strip()) for key in sorted(topics)
                 if split_of("prose:" + key, _PROSE_BUCKETS) == split and topics[key].strip())


# ---- math ------------------------------------------------------------------------------------------------------

def _add(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", a + b


def _sub(rng: random.Random) -> tuple[str, int]:
    a = rng.randrange(100)
    b = rng.randrange(a + 1)
    return f"{a}-{b}=", a - b


def _mul(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randrange(2, 10), rng.randrange(2, 10)
    return f"{a}*{b}=", a * b


def _muladd(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randrange(2, 10), rng.randrange(2, 10), rng.randrange(100)
    return f"{a}*{b}+{c}=", a * b + c


# form name -> (generator, sampling weight). Addition and subtraction dominate because they generalise to
# unseen operand pairs; multiplication facts are learnt through the many a*b+c problems that contain them.
MATH_FORMS: dict[str, tuple[Callable[[random.Random], tuple[str, int]], int]] = {
    "add": (_add, 35), "sub": (_sub, 30), "mul": (_mul, 10), "muladd": (_muladd, 25),
}


def math_problem(rng: random.Random, split: str) -> tuple[str, str, str]:
    """Draw one problem of ``split``: (form, prompt such as ``37+45=``, answer such as ``82``)."""
    names = list(MATH_FORMS)
    weights = [MATH_FORMS[n][1] for n in names]
    while True:
        form = rng.choices(names, weights)[0]
        prompt, answer = MATH_FORMS[form][0](rng)
        if split_of("math:" + prompt) == split:
            return form, prompt, str(answer)


def math_worksheet(rng: random.Random, split: str, lines: int = WORKSHEET_LINES) -> Document:
    return Document(text="\n".join(p + a for _, p, a in (math_problem(rng, split) for _ in range(lines))))


@functools.lru_cache(maxsize=None)
def _math(split: str) -> tuple[Document, ...]:
    rng = random.Random(f"testbed-math-{split}")
    return tuple(math_worksheet(rng, split) for _ in range(MATH_DOCS[split]))


# ---- public ----------------------------------------------------------------------------------------------------

_BUILDERS = {"code": _code, "prose": _prose, "math": _math}


def documents(domain: str, split: str) -> list[Document]:
    """The documents of one domain and split, in a fixed order. ``mix`` interleaves code, prose and math."""
    _check(domain, split)
    if domain != "mix":
        return list(_BUILDERS[domain](split))
    parts = [documents(d, split) for d in ("code", "prose", "math")]
    mixed = []
    for i in range(max(len(p) for p in parts)):
        mixed.extend(p[i] for p in parts if i < len(p))
    return mixed


def source(name: str, split: str) -> list[Document]:
    """The ``testbed:NAME`` data source (entry point ``testbed`` of the group ``allocopt.data_sources``)."""
    return documents(name, split)
