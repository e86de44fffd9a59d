"""Math verifier: final-answer extraction, then math-verify's parsing and equivalence.

Extraction (ours, so that what is graded is explicit): with ``after_think`` only the text after the
last ``</think>`` counts (none: no answer). The final answer is the content of the last
``\\boxed{...}``; else the last ``#### X`` line; else the last "The answer is X"; else, with
``final_equation`` (default on), a last line that ends by stating a number (``... = 204$.``).
Nothing else: a completion that only repeats numbers has no answer. The span loses a trailing
period and ``\\textbf{}``/``\\text{}`` wrappers, and a lone parenthesised number its parentheses. The
extracted span and the gold are then parsed and compared by math-verify (LaTeX and plain numbers, fractions, sets,
intervals, percent and units as it handles them). A gold math-verify cannot parse gives ``ungradable_gold``.

math-verify evaluates what it parses: "The answer is 2+7-5" equals a gold 4. On a task whose problem is the
expression itself, a policy that restates the problem is then always right (GRPO on SmolLM2 found this in 54
steps, docs/RESULTS.md). ``literal_answers=True`` (``verifier.options={literal_answers: true}``) grades such an
answer ``unevaluated``: when the gold is a number, the answer must be a number too (a sign, digits, thousands
commas, a decimal part; or a fraction ``a/b`` or ``\\frac{a}{b}``).

This class does no time bounding itself: run it through :class:`~stagewise_pl.verify.pool.GradingPool`
(``make_verifier`` does), which kills and replaces a worker stuck on a pathological input.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

from stagewise_pl.verify.base import VERIFIERS, Verdict
from stagewise_pl.verify.exact import THINK_END, last_boxed

_HASHES = re.compile(r"####[ \t]*([^\n]+)")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+)", re.IGNORECASE)
_WRAPPER = re.compile(r"\\(?:textbf|mathbf|text|mathrm)\{(.*)\}", re.DOTALL)
_LONE_NUMBER = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*\)")
# A last line that ends by stating a value: "... = 204$." (a careful reader takes 204)
_FINAL_EQUATION = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)\s*\$?\s*\.?\s*(?:-\S+)?\s*$")
# A number written out: what literal_answers requires of an answer to a numeric gold
_LITERAL = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\d+\s*/\s*\d+|[-+]?\\[dt]?frac\{[-+]?\d+\}\{\d+\}")


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def clean_span(span: str) -> Optional[str]:
    """Answer-span cleanup a human grader does without thinking: a trailing period, a bold or text
    wrapper, and parentheses around a lone number (AIME/AMC style ``\textbf{(073)}``)."""
    span = span.strip().rstrip(".").strip()
    for _ in range(3):
        wrapped = _WRAPPER.fullmatch(span)
        if not wrapped or not _balanced(wrapped.group(1)):  # "\text{a} + \text{b}" is not one wrapper
            break
        span = wrapped.group(1).strip()
    lone = _LONE_NUMBER.fullmatch(span)
    if lone:
        span = lone.group(1)
    return span or None


def extract_final_answer(completion: str, after_think: bool = False, final_equation: bool = True) -> Optional[str]:
    """The span the completion commits to as its final answer, or None."""
    if after_think:
        if THINK_END not in completion:
            return None
        completion = completion.rsplit(THINK_END, 1)[1]
    boxed = last_boxed(completion)
    if boxed is not None:
        return clean_span(boxed)
    hashes = _HASHES.findall(completion)
    if hashes:
        return clean_span(hashes[-1])
    found = _ANSWER_IS.findall(completion)
    if found:
        return clean_span(found[-1])
    if final_equation:
        lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
        match = _FINAL_EQUATION.search(lines[-1]) if lines else None
        if match:
            return clean_span(match.group(1))
    return None


def _parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # math-verify's own SIGALRM timeouts are off: the grading pool bounds every call from outside.
    return parse(f"\\boxed{{{text}}}", extraction_config=config, parsing_timeout=None)


@lru_cache(maxsize=4096)
def parse_gold(gold: str):
    """math-verify's parse of a gold answer (cached: one gold is graded against many samples)."""
    return _parse(gold.strip()) if gold and gold.strip() else []


@VERIFIERS.register("math")
class MathVerifier:
    def __init__(self, after_think: bool = False, final_equation: bool = True, literal_answers: bool = False):
        import logging

        self.after_think, self.final_equation, self.literal_answers = after_think, final_equation, literal_answers
        # math-verify warns on every call that its own timeout is off (the pool bounds calls instead);
        # emitting that warning cost 5-10% of the grading time here.
        logging.getLogger("math_verify").setLevel(logging.ERROR)

    def score(self, completion: str, gold: str) -> Verdict:
        from math_verify import verify

        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            return Verdict(0.0, "ungradable_gold")
        answer = extract_final_answer(completion, self.after_think, self.final_equation)
        if answer is None:
            return Verdict(0.0, "no_answer")
        if self.literal_answers and _LITERAL.fullmatch(gold.strip()) and not _LITERAL.fullmatch(answer.strip()):
            return Verdict(0.0, "unevaluated")  # "2+7-5" for 4: math-verify would evaluate it and agree
        answer_parsed = _parse(answer)
        if not answer_parsed:
            return Verdict(0.0, "wrong")
        same = verify(gold_parsed, answer_parsed, timeout_seconds=None)
        return Verdict(1.0, "correct") if same else Verdict(0.0, "wrong")

    def gold_is_gradable(self, gold: str) -> bool:
        return bool(parse_gold(gold))
