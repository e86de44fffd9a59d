"""The dataset's own worked solutions as the teacher (``teacher.name=dataset``).

A pool whose rows carry a human-written solution (GSM8K's rationale, MATH's solution) needs no teacher model: each
problem's ``solution`` is its trace. GSM8K's calculator annotations are already stripped when the pool is read
(:func:`stagewise_pl.data.loaders.strip_calculator`); its final ``#### N`` line is replaced by ``answer_line``
(``teacher.args.answer_line``, e.g. ``"The answer is {answer}."`` or ``"The answer is \\boxed{{answer}}."``: the
answer format the run's system prompt asks for; ``{answer}`` is replaced by the gold), or kept when ``answer_line``
is empty. A solution without a ``####`` line gets ``answer_line`` appended.
The traces are counted as teacher texts by the phases that use them, as any teacher's. The dataset holds no
critiques: ``critique`` raises, so a CFT phase needs ``teacher.critic`` set to another teacher.
"""
from __future__ import annotations

import re
from typing import Sequence

from stagewise_pl.data.problems import Problem
from stagewise_pl.teachers.base import TEACHERS, TeacherError

_FINAL = re.compile(r"\n?[ \t]*####[^\n]*\s*$")


def render_solution(solution: str, answer: str, answer_line: str = "") -> str:
    """The trace of a dataset solution: its final ``#### N`` line replaced by ``answer_line`` (``{answer}`` filled
    in), or the solution as it is when ``answer_line`` is empty."""
    if not answer_line:
        return solution.strip()
    line = answer_line.replace("{answer}", answer)  # not str.format: LaTeX braces (\\boxed{{answer}}) stay as written
    body = _FINAL.sub("", solution.rstrip()).rstrip()
    return f"{body}\n{line}" if body else line


@TEACHERS.register("dataset")
class DatasetTeacher:
    def __init__(self, answer_line: str = ""):
        if answer_line and "{answer}" not in answer_line:
            raise TeacherError(f"teacher dataset: answer_line {answer_line!r} must contain {{answer}}")
        self.answer_line = answer_line

    def traces(self, problems: Sequence[Problem], n: int = 1) -> list[list[str]]:
        missing = [p.id for p in problems if not (p.solution or "").strip()]
        if missing:
            raise TeacherError(f"teacher dataset: {len(missing)} problems have no solution in the pool, e.g. "
                               f"{missing[:3]} (the pool's rows need a solution field: data.fields.solution, or a "
                               f"format that reads one)")
        return [[render_solution(p.solution, p.answer, self.answer_line)] for p in problems]

    def critique(self, problem: Problem, failed_completion: str) -> str:
        raise TeacherError("teacher dataset holds worked solutions, not critiques: set teacher.critic to a teacher "
                           "that writes them")
