"""The synthetic task's programmatic teacher: exact traces and exact first-error diagnoses."""
from __future__ import annotations

from typing import Sequence

from stagewise_pl.data.problems import Problem
from stagewise_pl.teachers.base import TEACHERS, TeacherError, VERDICT_CORRECT, VERDICT_INCORRECT


@TEACHERS.register("programmatic")
class ProgrammaticTeacher:
    """Knows the arithmetic task: the trace is the step-by-step evaluation, the diagnosis is
    :meth:`ArithmeticTask.first_error` of the failed solution put into words."""

    def __init__(self, task):
        self.task = task

    def traces(self, problems: Sequence[Problem], n: int = 1) -> list[list[str]]:
        out = []
        for p in problems:
            try:
                out.append([self.task.trace(p.prompt)])  # one exact trace: more would be copies
            except (ValueError, IndexError) as exc:
                raise TeacherError(f"problem {p.id}: not an expression of the synthetic task ({exc})") from None
        return out

    def critique(self, problem: Problem, failed_completion: str) -> str:
        try:
            error = self.task.first_error(problem.prompt, failed_completion)
        except (ValueError, IndexError) as exc:
            raise TeacherError(f"problem {problem.id}: not an expression of the synthetic task ({exc})") from None
        if error is None:
            return f"Every step and the final answer are right.\n{VERDICT_CORRECT}"
        return f"{error.describe()}\n{VERDICT_INCORRECT}"
