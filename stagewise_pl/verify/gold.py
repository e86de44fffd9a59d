"""Gold answers are checked when a pool is loaded: a gold the verifier cannot grade is flagged.

The check is the verifier's own: the gold, written as a final answer (``\\boxed{gold}``), graded
against itself must come out ``correct``. A flagged problem keeps its place in the pool (SFT can
still learn its solution) but carries ``meta["ungradable_gold"]`` with the reason, and
:func:`gradable` leaves it out of everything that needs a reward: evaluation, profiling and RL.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from stagewise_pl.data.problems import Problem

FLAG = "ungradable_gold"


def flag_ungradable_golds(problems: Sequence[Problem], verifier, progress: bool = False) -> Counter:
    """Grade every distinct gold against itself; flag the problems whose gold fails. Returns reasons."""
    golds = sorted({p.answer for p in problems})
    verdicts = verifier.score_batch([f"\\boxed{{{g}}}" for g in golds], golds, progress=progress, desc="gold check")
    failed = {g: v.reason for g, v in zip(golds, verdicts) if v.reason != "correct"}
    reasons: Counter = Counter()
    for p in problems:
        if p.answer in failed:
            p.meta[FLAG] = failed[p.answer]
            reasons[failed[p.answer]] += 1
    return reasons


def gradable(problems: Sequence[Problem]) -> list[Problem]:
    return [p for p in problems if FLAG not in p.meta]
