"""``evaluate(model, tokenizer)``: every testbed task on the held-out split, for any causal LM.

Works the same on the shipped testbed, on a model inside ``allocopt.models.mask_experts(...)`` and on an exported
pruned checkpoint, because it only calls ``model(...)`` and ``model.generate(...)``.

    from allocopt.runtime import load_model
    model, tokenizer = load_model("testbed")
    print(evaluate(model, tokenizer)["math_em"])
"""
from __future__ import annotations

import difflib
import time
from collections import defaultdict

from torch import nn

from allocopt.data.tokens import documents_to_tokens
from allocopt.evaluation import tasks
from allocopt.evaluation.generation import TokenGenerator, first_line, greedy_continuations
from allocopt.evaluation.likelihood import multiple_choice_accuracy
from allocopt.evaluation.perplexity import perplexity

# Items per task when no --limit is given; sized so the whole evaluation of the testbed stays under ~60 s on CPU.
PPL_SEQS, PPL_SEQ_LEN = 32, 256
MATH_ITEMS, CODE_ITEMS, MC_ITEMS = 300, 100, 100
MATH_MAX_TOKENS, CODE_MAX_TOKENS = 8, 24
PPL_DOMAINS = ("code", "prose", "math")


def _cap(default: int, limit: int | None) -> int:
    return default if limit is None else min(default, limit)


def math_em(model: nn.Module | TokenGenerator, tokenizer, limit: int | None = None,
            corpus: str = "testbed") -> tuple[float, dict[str, float]]:
    """Exact match of the greedy answer (cut at the newline) on held-out arithmetic, overall and per form."""
    items = tasks.math_items(tasks.corpus_named(corpus))[:_cap(MATH_ITEMS, limit)]
    outputs = greedy_continuations(model, tokenizer, [i["prompt"] for i in items], MATH_MAX_TOKENS)
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, text in zip(items, outputs):
        hits[item["form"]].append(first_line(text).strip() == item["answer"])
    flat = [h for v in hits.values() for h in v]
    return sum(flat) / len(flat), {f: sum(v) / len(v) for f, v in sorted(hits.items())}


def code_completion(model: nn.Module | TokenGenerator, tokenizer, limit: int | None = None,
                    corpus: str = "testbed") -> dict[str, float]:
    """Next-line completion of held-out code, two scores of one greedy continuation per item:

    * ``code_em``: the continuation is a newline followed by exactly the held-out line (trailing spaces ignored);
    * ``code_edit_sim``: the mean similarity in [0, 1] of the generated line to the held-out one, the partial credit
      of line-level code completion (CodeXGLUE, Lu et al. 2021, scores an edit-distance ratio; here
      ``difflib.SequenceMatcher.ratio``). Exact match is 0 for models this small even unpruned; the similarity
      still moves with what pruning removes.
    """
    items = tasks.code_items(tasks.corpus_named(corpus))[:_cap(CODE_ITEMS, limit)]
    outputs = greedy_continuations(model, tokenizer, [i["prompt"] for i in items], CODE_MAX_TOKENS)
    lines = [first_line(text[1:]).rstrip() if text.startswith("\n") else "" for text in outputs]
    hits = [line == item["answer"] for item, line in zip(items, lines)]
    sims = [difflib.SequenceMatcher(None, line, item["answer"]).ratio() for item, line in zip(items, lines)]
    return {"code_em": sum(hits) / len(hits), "code_edit_sim": sum(sims) / len(sims)}


def generation_metrics(model: nn.Module | TokenGenerator, tokenizer, limit: int | None = None,
                       corpus: str = "testbed") -> dict:
    """The open-ended tasks only (math exact match, code completion), for any engine: a model or a ``TokenGenerator``
    such as vLLM (``allocopt eval --backend vllm``)."""
    start = time.time()
    math, math_by_form = math_em(model, tokenizer, limit, corpus)
    return {"math_em": math, **code_completion(model, tokenizer, limit, corpus), "math_em_by_form": math_by_form,
            "seconds": round(time.time() - start, 1)}


def evaluate(model: nn.Module, tokenizer, limit: int | None = None, corpus: str = "testbed") -> dict:
    """Held-out metrics: ``ppl`` (per domain), ``math_em``, ``code_em``, ``code_edit_sim``, ``mc_acc`` (mean over
    domains), details.
    ``corpus``: whose held-out split (``tasks.CORPORA``: the first testbed's, or ``deep``)."""
    start = time.time()
    model.eval()
    source = tasks.corpus_named(corpus)
    ppl = {}
    for domain in PPL_DOMAINS:
        tokens = documents_to_tokens(source.documents(domain, "heldout"), tokenizer, PPL_SEQ_LEN,
                                     _cap(PPL_SEQS, limit), f"{corpus}:{domain}")
        ppl[domain] = perplexity(model, tokens)
    math, math_by_form = math_em(model, tokenizer, limit, corpus)
    mc = {d: multiple_choice_accuracy(model, tokenizer, tasks.mc_items(d, source)[:_cap(MC_ITEMS, limit)])
          for d in PPL_DOMAINS}
    return {
        "ppl": ppl,
        "math_em": math,
        **code_completion(model, tokenizer, limit, corpus),
        "corpus": corpus,
        "mc_acc": sum(mc.values()) / len(mc),
        "math_em_by_form": math_by_form,
        "mc_acc_by_domain": mc,
        "seconds": round(time.time() - start, 1),
    }
