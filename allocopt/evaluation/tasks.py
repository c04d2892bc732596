"""Fixed, seeded held-out item lists of the testbed tasks (built from a testbed corpus's ``heldout`` split only).

Every function takes the corpus module (``CORPORA``: the first testbed's by default, ``deep`` for the deep testbed).

* math EM: a worksheet's three previous lines, then ``a+b=``; the answer is generated up to the newline.
* code EM: the preceding lines of a held-out source file (without the final newline); the next line is generated.
* multiple choice: math answers against near-miss numbers; prose/code true next lines against lines of other
  held-out documents of the same domain.
"""
from __future__ import annotations

import functools
import importlib
import random
from types import ModuleType

from allocopt.errors import AllocoptError
from allocopt.testbed import corpus

CORPORA = {"testbed": "allocopt.testbed.corpus", "deep": "allocopt.testbed.deep.corpus"}


def corpus_named(name: str) -> ModuleType:
    """The corpus module of the testbed tasks ``name`` (a key of ``CORPORA``)."""
    if name not in CORPORA:
        raise AllocoptError(f"unknown task corpus {name!r}; use one of {', '.join(CORPORA)}")
    return importlib.import_module(CORPORA[name])

SEED = 1234
CONTEXT_LINES = 3          # solved problems shown before a math question
CODE_CONTEXT_CHARS = 600   # preceding code shown before the line to complete
MC_CONTEXT_CHARS = 400
MC_CHOICES = 4


@functools.lru_cache(maxsize=None)
def math_items(source: ModuleType = corpus) -> tuple[dict, ...]:
    """Unique held-out problems: ``{"form", "prompt", "answer"}``; the prompt carries 3 solved lines of context."""
    seen, items = set(), []
    form_of = getattr(source, "form_of", _form_of)
    for doc in source.documents("math", "heldout"):
        lines = doc.text.split("\n")
        for i in range(CONTEXT_LINES, len(lines)):
            question, answer = lines[i].rsplit("=", 1)
            if question in seen:
                continue
            seen.add(question)
            items.append({"form": form_of(question), "prompt": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n" + question + "=",
                          "answer": answer})
    random.Random(SEED).shuffle(items)
    return tuple(items)


def _form_of(question: str) -> str:
    if "*" in question:
        return "muladd" if "+" in question else "mul"
    return "add" if "+" in question else "sub"


def _lines_with_context(text: str, min_len: int, max_len: int, context_chars: int) -> list[tuple[str, str]]:
    """(context, line) pairs: the context ends right before the newline that precedes ``line``."""
    lines = text.split("\n")
    pairs = []
    for i in range(4, len(lines)):
        if min_len <= len(lines[i].strip()) <= max_len and lines[i - 1].strip():
            context = "\n".join(lines[:i])[-context_chars:]
            pairs.append((context, lines[i].rstrip()))
    return pairs


@functools.lru_cache(maxsize=None)
def code_items(source: ModuleType = corpus) -> tuple[dict, ...]:
    """Next-line completion: ``{"prompt", "answer"}`` where the model should continue with ``"\\n" + answer``."""
    pairs = [p for doc in source.documents("code", "heldout") for p in _lines_with_context(doc.text, 4, 60, CODE_CONTEXT_CHARS)]
    random.Random(SEED).shuffle(pairs)
    return tuple({"prompt": c, "answer": a} for c, a in pairs)


def _math_distractors(answer: int, rng: random.Random) -> list[str]:
    candidates = {answer + d for d in (-10, -2, -1, 1, 2, 10)} | {int(str(answer)[::-1])}
    candidates = sorted(c for c in candidates if c >= 0 and c != answer)
    return [str(c) for c in rng.sample(candidates, MC_CHOICES - 1)]


@functools.lru_cache(maxsize=None)
def mc_items(domain: str, source: ModuleType = corpus) -> tuple[dict, ...]:
    """``{"context", "choices", "answer"}`` with 4 choices, the true one at a seeded position."""
    rng = random.Random(f"{SEED}-{domain}")
    items = []
    if domain == "math":
        for item in math_items(source):
            choices = [item["answer"]] + _math_distractors(int(item["answer"]), rng)
            items.append((item["prompt"], [c + "\n" for c in choices]))
    else:
        docs = source.documents(domain, "heldout")
        per_doc = [_lines_with_context(d.text, 20, 120, MC_CONTEXT_CHARS) for d in docs]
        for d, pairs in enumerate(per_doc):
            others = [line for o, p in enumerate(per_doc) if o != d for _, line in p]
            for context, line in pairs:
                items.append((context, ["\n" + line] + ["\n" + x for x in rng.sample(others, MC_CHOICES - 1)]))
        rng.shuffle(items)
    out = []
    for context, choices in items:
        order = list(range(MC_CHOICES))
        rng.shuffle(order)
        out.append({"context": context, "choices": [choices[j] for j in order], "answer": order.index(0)})
    return tuple(out)
