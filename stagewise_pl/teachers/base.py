"""The teacher interface: reasoning traces for problems, and critiques of failed solutions.

Groundwork of the Bridge+CFT issue: Bridge SFT needs teacher traces to make learnable, critique
fine-tuning needs diagnoses of the policy's failures. Every teacher answers two calls:

- ``traces(problems, n)`` → for each problem, up to ``n`` full reasoning traces (strings ending in
  the final answer);
- ``critique(problem, failed_completion)`` → a diagnosis that locates and explains the first error
  of ``failed_completion`` and ends with a verdict line (:data:`VERDICT_INCORRECT` or
  :data:`VERDICT_CORRECT`).

A teacher that cannot answer raises :class:`TeacherError` naming the problem and the reason; one whose endpoint
answers nothing at all raises :class:`TeacherUnavailable` (the run stops; it does not train on without it).
Teachers are registered by name in :data:`TEACHERS` (or found by dotted path).
"""
from __future__ import annotations

from typing import Protocol, Sequence

from stagewise_pl.data.problems import Problem
from stagewise_pl.registry import Registry

VERDICT_INCORRECT = "Verdict: incorrect"
VERDICT_CORRECT = "Verdict: correct"

TEACHERS: Registry = Registry("teacher")


class TeacherError(RuntimeError):
    """A teacher could not answer for a problem; the message says which and why."""


class TeacherUnavailable(TeacherError):
    """The teacher's endpoint answered none of a call's requests after its retries (down, refusing, or gone away
    mid-phase): not a teacher with nothing to say, so the run stops (exit 7) rather than train without it; the
    answers it gave before are in its disk cache, and resume=last asks for none of them again."""


class Teacher(Protocol):
    def traces(self, problems: Sequence[Problem], n: int = 1) -> list[list[str]]: ...

    def critique(self, problem: Problem, failed_completion: str) -> str: ...


def verdict_of(critique: str) -> str | None:
    """The verdict line a critique ends with, or None if it has none."""
    lines = [ln.strip() for ln in critique.strip().splitlines() if ln.strip()]
    return lines[-1] if lines and lines[-1] in (VERDICT_INCORRECT, VERDICT_CORRECT) else None


def make_teacher(name: str, args: dict, **context):
    """The teacher registered as ``name`` (or at a dotted path), built with ``args``; a keyword of its
    constructor that ``args`` leaves out is filled from ``context`` (task, prompts, cache_dir, style, ...)
    when given."""
    import inspect

    cls = TEACHERS.get(name)
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in context.items() if k in params and k not in args and v is not None}
    try:
        return cls(**kwargs, **args)
    except TypeError as exc:
        raise TeacherError(f"teacher {name}: {exc}") from None


def ask_each(teacher, method: str, items: Sequence[tuple]) -> list:
    """``teacher.<method>(*item)`` for every item, through ``<method>_many`` when the teacher has it (an LLM
    teacher then sends them concurrently); None where the teacher raised :class:`TeacherError`."""
    many = getattr(teacher, f"{method}_many", None)
    if many is not None:
        try:
            return list(many(list(items)))
        except TeacherUnavailable:
            raise
        except TeacherError:
            return [None] * len(items)
    out = []
    for item in items:
        try:
            out.append(getattr(teacher, method)(*item))
        except TeacherUnavailable:
            raise
        except TeacherError:
            out.append(None)
    return out
