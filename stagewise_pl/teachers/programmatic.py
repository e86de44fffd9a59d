"""The synthetic task's programmatic teacher: exact traces, simplifications, repairs and first-error diagnoses.

``style`` sets what its traces look like. ``steps``: one operation per line, the granularity the tiny
student is warmed up on. ``chunked`` (reconstruction, a config option): ``ops_per_line`` operations per
line -- correct traces that skip steps the student needs, the stand-in on the synthetic task for a large
model's traces that Bridge has to make learnable. With ``n > 1`` a chunked teacher gives further traces
cut at other, seeded places (what ``min_nll_select`` chooses among).
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from stagewise_pl.data.problems import Problem
from stagewise_pl.teachers.base import TEACHERS, TeacherError, VERDICT_CORRECT, VERDICT_INCORRECT

STYLES = ("steps", "chunked")


@TEACHERS.register("programmatic")
class ProgrammaticTeacher:
    """Knows the arithmetic task: the trace is the evaluation written out, the diagnosis is
    :meth:`ArithmeticTask.first_error` of the failed solution put into words."""

    def __init__(self, task, style: str = "steps", ops_per_line: int = 2):
        if style not in STYLES:
            raise TeacherError(f"programmatic teacher: style {style!r} is not one of {', '.join(STYLES)}")
        if int(ops_per_line) < 1:
            raise TeacherError(f"programmatic teacher: ops_per_line must be >= 1, got {ops_per_line}")
        self.task, self.style, self.ops_per_line = task, style, int(ops_per_line)

    def _expr(self, problem: Problem) -> str:
        if not re.fullmatch(r"\s*\d+(\s*[+\-*]\s*\d+)+\s*", problem.prompt):
            raise TeacherError(f"problem {problem.id}: not an expression of the synthetic task")
        return problem.prompt

    def _sizes(self, steps: int, rng: random.Random | None) -> list[int]:
        sizes, left = [], steps
        while left:
            size = min(left, self.ops_per_line if rng is None else rng.randint(1, self.ops_per_line))
            sizes.append(size)
            left -= size
        return sizes

    def traces(self, problems: Sequence[Problem], n: int = 1) -> list[list[str]]:
        out = []
        for p in problems:
            expr = self._expr(p)
            if self.style == "steps":
                out.append([self.task.trace(expr)])  # one exact trace: more would be copies
                continue
            steps = self.task.steps_of(expr)
            found = [self.task.chunked_trace(expr, self._sizes(steps, None))]
            for j in range(1, max(1, n) * 4):  # other cuts, seeded by the problem; duplicates dropped
                if len(found) >= n:
                    break
                trace = self.task.chunked_trace(expr, self._sizes(steps, random.Random(f"{p.id}-{j}")))
                if trace not in found:
                    found.append(trace)
            out.append(found)
        return out

    def simplify(self, problem: Problem, trace: str) -> str:
        """Any trace rewritten at the student's granularity: one operation per line (exact)."""
        return self.task.trace(self._expr(problem))

    def critique(self, problem: Problem, failed_completion: str) -> str:
        error = self.task.first_error(self._expr(problem), failed_completion)
        if error is None:
            return f"Every step and the final answer are right.\n{VERDICT_CORRECT}"
        return f"{error.describe()}\n{VERDICT_INCORRECT}"

    def repair(self, problem: Problem, failed_completion: str, critique: str = "") -> str:
        """The failed solution kept up to its first wrong step, then continued correctly."""
        expr = self._expr(problem)
        error = self.task.first_error(expr, failed_completion)
        trace_lines = self.task.trace(expr).splitlines()
        if error is None:
            return failed_completion
        body = [ln.strip() for ln in failed_completion.split("####", 1)[0].strip().splitlines() if ln.strip()]
        return "\n".join(body[:error.step] + trace_lines[error.step:])
