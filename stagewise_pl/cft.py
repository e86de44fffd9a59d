"""Critique fine-tuning data from the ledger: what RL could not solve becomes something to learn from.

Reconstruction (after Critique Fine-Tuning, Critique-GRPO, STaR and ReLIFT; the paper's body was not
available). For each selected problem, its failed rollouts of the latest profile or GRPO phase that
graded it give three kinds of examples (``cft.weights`` weighs each kind's loss; 0 leaves it out):

- **diagnosis**: input = the problem and a failed solution (``cft_diagnosis`` template), target = the
  critic's critique, which must locate the first error and end with a verdict line. A critique with no
  verdict, or that calls the (known wrong) failure correct, is not kept.
- **repair**: input = the problem, the failure and its critique (``cft_repair``), target = a corrected
  solution that continues from the failure: ``cft.repair_by=student`` keeps the failure's lines before
  the step the critique names (``cft.step_pattern``) and lets the student continue; ``teacher`` asks
  the teacher. Kept only if the verifier accepts it.
- **trace**: input = the problem, target = a new reasoning trace through Bridge (``bridge.strategy``).

Every rejected candidate is counted by kind and reason.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from stagewise_pl.bridge import ACCEPTED, BridgeContext, first_accepted, run_bridge, written
from stagewise_pl.data.problems import Problem
from stagewise_pl.teachers.base import TeacherError, VERDICT_INCORRECT, ask_each, verdict_of

KINDS = ("diagnosis", "repair", "trace")


@dataclass
class CFTItem:
    problem_id: str
    kind: str  # diagnosis | repair | trace
    prompt: str  # the user message (the chat template is applied when it is encoded)
    target: str
    failure: str = ""  # the failed rollout a diagnosis or repair is about (kept for audit)


def judge_critique(text) -> str:
    if text is None:
        return "teacher_failed"
    if not text.strip():
        return "empty"
    verdict = verdict_of(text)
    if verdict is None:
        return "no_verdict"
    return ACCEPTED if verdict == VERDICT_INCORRECT else "wrong_verdict"


def kept_prefix(failure: str, critique: str, pattern: str) -> str:
    """The failure's lines before the first wrong step the critique names ('' when it names none)."""
    match = re.search(pattern, critique)
    if not match:
        return ""
    lines = failure.split("####", 1)[0].strip().splitlines()
    keep = max(0, int(match.group(1)) - 1)
    return "".join(line + "\n" for line in lines[:keep])


def build_cft(ctx: BridgeContext, critic, teacher, strategy, problems: Sequence[Problem],
              failures: dict[str, list[str]], settings) -> tuple[list[CFTItem], dict]:
    """CFT items for ``problems`` from their ``failures`` and a summary (kept and rejected per kind)."""
    weights, items = settings.weights, []
    counts = {kind: Counter() for kind in KINDS}
    pairs = [(p, f) for p in problems for f in failures.get(p.id, [])[:settings.failures_per_problem]]
    critiques: list = []
    verdicts: list[str] = []
    if weights.get("diagnosis", 0) > 0 or weights.get("repair", 0) > 0:
        critiques = ask_each(critic, "critique", pairs)
        ctx.teacher_texts += written(critiques)
        verdicts = [judge_critique(text) for text in critiques]
        for (p, f), text, reason in zip(pairs, critiques, verdicts):
            counts["diagnosis"][reason] += 1
            if reason == ACCEPTED and weights.get("diagnosis", 0) > 0:
                asked = ctx.template("cft_diagnosis", problem=p.prompt, solution=f)
                items.append(CFTItem(p.id, "diagnosis", asked, text, f))
    if weights.get("repair", 0) > 0:
        usable = [(p, f, c) for (p, f), c, v in zip(pairs, critiques, verdicts) if v == ACCEPTED]
        counts["repair"]["no_diagnosis"] += len(pairs) - len(usable)
        for (p, f, c), (text, reason) in zip(usable, repairs(ctx, teacher, usable, settings)):
            counts["repair"][reason] += 1
            if reason == ACCEPTED:
                items.append(CFTItem(p.id, "repair", ctx.template("cft_repair", problem=p.prompt, solution=f,
                                                                  critique=c), text, f))
    bridge_summary = None
    if weights.get("trace", 0) > 0:
        bridged, bridge_summary = run_bridge(strategy, ctx, problems)
        by_id = {p.id: p for p in problems}
        for it in bridged:
            counts["trace"]["bridged" if it.kept else ("raw" if it.target is not None else "dropped")] += 1
            if it.target is not None:
                items.append(CFTItem(it.problem_id, "trace", by_id[it.problem_id].prompt, it.target))
    summary = {"problems": len(problems), "failures": len(pairs),
               "kept": {kind: sum(1 for it in items if it.kind == kind) for kind in KINDS},
               "outcomes": {kind: dict(sorted(c.items())) for kind, c in counts.items() if c},
               "bridge": bridge_summary}
    return items, summary


def repairs(ctx: BridgeContext, teacher, usable: Sequence[tuple], settings) -> list[tuple]:
    """(corrected solution or None, reason) per (problem, failure, critique)."""
    if not usable:
        return []
    if settings.repair_by == "teacher":
        if not hasattr(teacher, "repair"):
            raise TeacherError(f"cft.repair_by=teacher: teacher {type(teacher).__name__} cannot write repairs")
        texts = ask_each(teacher, "repair", usable)
        ctx.teacher_texts += written(texts)
        reasons = ctx.judge(texts, [p.answer for p, _, _ in usable], count=False)
        return list(zip(texts, reasons))
    n = settings.repair_samples
    prefixes = [kept_prefix(f, c, settings.step_pattern) for _, f, c in usable]
    batch = ctx.sample([ctx.render(p.prompt) + pre for (p, _, _), pre in zip(usable, prefixes)], n,
                       desc="cft: student repairs")
    texts = [prefixes[i // n] + batch.texts[i] for i in range(len(batch.texts))]
    reasons = ctx.judge(texts, [p.answer for p, _, _ in usable for _ in range(n)], count=False)
    return [first_accepted([(texts[r], reasons[r]) for r in batch.samples_of(i)]) for i in range(len(usable))]
