"""Exact verifier: the final answer, normalised, must equal the gold as an integer, a number or a string.

The final answer is, in this order: the first ``#### X`` (the synthetic task's convention: a
completion commits to its first answer line, so writing several does not help), else the last
``\\boxed{X}``, else the last "The answer is X". Normalisation strips ``$``, spaces, a trailing
period and thousands separators; two numbers compare by value (``3/4`` equals ``0.75``).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

from stagewise_pl.verify.base import VERIFIERS, Verdict

THINK_END = "</think>"
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]+)", re.IGNORECASE)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(completion: str) -> Optional[str]:
    match = _HASHES.search(completion)
    if match:
        return match.group(1)
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    found = _ANSWER_IS.findall(completion)
    return found[-1] if found else None


def normalise(text: str) -> str:
    text = text.strip().replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    return text


def as_number(text: str) -> Optional[Fraction]:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


@VERIFIERS.register("exact")
class ExactVerifier:
    def __init__(self, after_think: bool = False):
        self.after_think = after_think

    def score(self, completion: str, gold: str) -> Verdict:
        gold_n = normalise(gold or "")
        if not gold_n:
            return Verdict(0.0, "ungradable_gold")
        if self.after_think:
            if THINK_END not in completion:
                return Verdict(0.0, "no_answer")
            completion = completion.rsplit(THINK_END, 1)[1]
        raw = extract_answer(completion)
        if raw is None or not normalise(raw):
            return Verdict(0.0, "no_answer")
        answer = normalise(raw)
        a, g = as_number(answer), as_number(gold_n)
        same = (a == g) if (a is not None and g is not None) else (answer == gold_n)
        return Verdict(1.0, "correct") if same else Verdict(0.0, "wrong")

    def score_batch(self, completions: list[str], golds: list[str]) -> list[Verdict]:
        return [self.score(c, g) for c, g in zip(completions, golds)]
