"""The Problem schema: one row of a problem pool, whatever file or task it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Problem:
    """One problem.

    ``prompt`` is the problem text shown to the model (the chat template is applied later);
    ``answer`` is the gold final answer; ``solution`` an optional reference solution written by the
    dataset's authors; ``teacher_traces`` optional full reasoning traces; ``level`` an optional
    difficulty label used to break evaluation down.
    """

    id: str
    prompt: str
    answer: str
    source: str
    solution: Optional[str] = None
    teacher_traces: list[str] = field(default_factory=list)
    level: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)


class BadRowError(ValueError):
    """A row that cannot become a Problem; the message names the file and line."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
