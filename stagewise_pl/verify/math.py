"""Math verifier: final-answer extraction, then math-verify's parsing and equivalence.

Extraction (ours, so that what is graded is explicit): with ``after_think`` only the text after the
last ``</think>`` counts (none: no answer). The final answer is the content of the last
``\\boxed{...}``; else the last ``#### X`` line; else the last "The answer is X". Nothing else: a
completion that only repeats numbers has no answer. The extracted span and the gold are then
parsed and compared by math-verify (LaTeX and plain numbers, fractions, sets, intervals, percent
and units as it handles them). A gold math-verify cannot parse gives ``ungradable_gold``.

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


def extract_final_answer(completion: str, after_think: bool = False) -> Optional[str]:
    """The span the completion commits to as its final answer, or None."""
    if after_think:
        if THINK_END not in completion:
            return None
        completion = completion.rsplit(THINK_END, 1)[1]
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip() or None
    hashes = _HASHES.findall(completion)
    if hashes:
        return hashes[-1].strip() or None
    found = _ANSWER_IS.findall(completion)
    if found:
        return found[-1].strip().rstrip(".").strip() or None
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
    def __init__(self, after_think: bool = False):
        self.after_think = after_think

    def score(self, completion: str, gold: str) -> Verdict:
        from math_verify import verify

        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            return Verdict(0.0, "ungradable_gold")
        answer = extract_final_answer(completion, self.after_think)
        if answer is None:
            return Verdict(0.0, "no_answer")
        answer_parsed = _parse(answer)
        if not answer_parsed:
            return Verdict(0.0, "wrong")
        same = verify(gold_parsed, answer_parsed, timeout_seconds=None)
        return Verdict(1.0, "correct") if same else Verdict(0.0, "wrong")

    def gold_is_gradable(self, gold: str) -> bool:
        return bool(parse_gold(gold))
