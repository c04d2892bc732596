"""Multi-step arithmetic word problems with their answers, for the deep testbed's math domain.

Each problem is one line ``<words> = <answer>`` (one ``=``, so the math tasks of ``evaluation.tasks`` read it like an
arithmetic line): two or three operations in words, small numbers, answers that are whole and not negative. A
worksheet mixes them with plain arithmetic lines (``37+45=82``), whose digits the model learns first.
"""
from __future__ import annotations

import random
from typing import Callable

from allocopt.testbed.corpus import MATH_FORMS

NAMES = ("Ann", "Ben", "Mia", "Leo", "Ada", "Sam", "Zoe", "Tom", "Eva", "Max", "Ivy", "Raj", "Lin", "Omar", "Nia")
THINGS = ("apples", "books", "coins", "cards", "pens", "stamps", "shells", "marbles", "cups", "seeds")


def _gain_loss(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randrange(5, 60), rng.randrange(1, 40)
    c = rng.randrange(0, a + b + 1)
    return f"{name} has {a} {thing}, gets {b} more and gives away {c}. {thing.capitalize()} left", a + b - c


def _packs(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randrange(2, 10), rng.randrange(2, 10), rng.randrange(0, 30)
    return f"{name} buys {a} packs of {b} {thing} and finds {c} more. {thing.capitalize()} in all", a * b + c


def _rows_taken(rng: random.Random) -> tuple[str, int]:
    thing = rng.choice(THINGS)
    a, b = rng.randrange(2, 10), rng.randrange(2, 10)
    c = rng.randrange(0, a * b + 1)
    return f"A box holds {a} rows of {b} {thing}. {c} are taken out. {thing.capitalize()} left", a * b - c


def _three_days(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(NAMES)
    a, b, c = rng.randrange(1, 40), rng.randrange(1, 40), rng.randrange(1, 40)
    return f"{name} reads {a} pages on Monday, {b} on Tuesday and {c} on Wednesday. Pages read", a + b + c


def _shared(rng: random.Random) -> tuple[str, int]:
    thing = rng.choice(THINGS)
    each, friends = rng.randrange(1, 10), rng.randrange(2, 10)
    extra = rng.randrange(0, 20)
    return (f"{each * friends} {thing} are shared equally by {friends} friends, then each gets {extra} more. "
            f"{thing.capitalize()} per friend", each + extra)


def _difference(rng: random.Random) -> tuple[str, int]:
    n1, n2 = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    c = rng.randrange(1, 20)
    a = rng.randrange(c + 10, 90)
    b = rng.randrange(0, a - c + 1)
    return f"{n1} has {a} {thing} and {n2} has {b}. {n2} gets {c} more. {n1} has more by", a - b - c


def _arithmetic(form: str) -> Callable[[random.Random], tuple[str, int]]:
    """The first testbed's arithmetic line of ``form`` (``testbed.corpus.MATH_FORMS``) without its ``=``."""
    make = MATH_FORMS[form][0]

    def draw(rng: random.Random) -> tuple[str, int]:
        question, answer = make(rng)
        return question.removesuffix("="), answer
    return draw


# form -> (generator, weight): word problems take most of the weight; the arithmetic lines teach the digits
FORMS: dict[str, tuple[Callable[[random.Random], tuple[str, int]], int]] = {
    "gain_loss": (_gain_loss, 16), "packs": (_packs, 14), "rows_taken": (_rows_taken, 12),
    "three_days": (_three_days, 12), "shared": (_shared, 8), "difference": (_difference, 8),
    "add": (_arithmetic("add"), 12), "sub": (_arithmetic("sub"), 10), "muladd": (_arithmetic("muladd"), 8),
}


def problem(rng: random.Random, in_split: Callable[[str], bool]) -> tuple[str, str, str]:
    """One problem whose question ``in_split`` accepts: ``(form, question without " = ", answer)``."""
    names = list(FORMS)
    weights = [FORMS[n][1] for n in names]
    while True:
        form = rng.choices(names, weights)[0]
        question, answer = FORMS[form][0](rng)
        if in_split(question):
            return form, question, str(answer)


def form_of(question: str) -> str:
    """The form a question was drawn from (its wording), for per-form scores."""
    for form, words in (("gain_loss", "gives away"), ("packs", "packs of"), ("rows_taken", "rows of"),
                        ("three_days", "on Monday"), ("shared", "shared equally"), ("difference", "has more by")):
        if words in question:
            return form
    if "*" in question:
        return "muladd"
    return "add" if "+" in question else "sub"


__all__ = ["FORMS", "form_of", "problem"]
