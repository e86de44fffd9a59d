"""The built-in synthetic reasoning task: left-to-right integer arithmetic.

A problem is an expression such as ``17+5-9`` evaluated strictly left to right. Its difficulty is
set by the number of operations (one reasoning step each) and the operand size (carries and
borrows). Running values never go negative: a subtraction that would is turned into an addition
when the problem is drawn.

Skill levels (``task.skill_levels``, after the plain ones) add a skill the base model never saw: multiplication
of the running value by a digit (``7*3``, ``4+3*2``, left to right). Its trace writes the product out as repeated
addition of the running value (``7+7=14``, ``14+7=21``): a rule only the teacher's traces show, carried out with
the additions the student already knows. The base model is warmed up on the plain levels alone (:meth:`plain`).

Three kinds of text per problem:
- the *teacher trace*: one line per step (``17+5=22``, ``22-9=13``), then ``#### 13``;
- the *reference solution*: the short form a human dataset would hold (``17+5-9 = 13``, then
  ``#### 13``), correct but with no intermediate steps;
- for a wrong solution, :meth:`ArithmeticTask.first_error` names the first wrong step and the
  correct value there: the programmatic teacher behind critiques.

Splits are drawn from ``task.seed`` alone: the held-out split is drawn first, and the training
split never contains an expression of the held-out one.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from stagewise_pl.data.problems import Problem

ANSWER_MARK = "####"
TIMES = "*"
_STEP = re.compile(r"^\s*(\d+)\s*([+\-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_FINAL = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Level:
    steps: int
    max_operand: int
    times: int = 0  # operations that multiply the running value by a digit (skill levels)


@dataclass
class StepError:
    """The first wrong step of a solution: 0-based step index, what was written, what was due."""

    step: int
    kind: str  # wrong_value | wrong_operands | missing_step | wrong_final | no_answer
    written: str
    expected: str
    correct_value: int

    def describe(self) -> str:
        if self.kind == "no_answer":
            return f"The solution never states a final answer; it should end with {self.expected}."
        if self.kind == "wrong_final":
            return f"The steps are right but the final answer is wrong: '{self.written}' should be '{self.expected}'."
        if self.kind == "missing_step":
            return f"Step {self.step + 1} is missing: it should be '{self.expected}'."
        return (f"Step {self.step + 1} is wrong: '{self.written}' should be '{self.expected}' "
                f"(the correct value there is {self.correct_value}).")


def apply(value: int, op: str, x: int) -> int:
    return value + x if op == "+" else value - x if op == "-" else value * x


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> list[int]:
    """Running values after each operation."""
    values, value = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        value = apply(value, op, x)
        values.append(value)
    return values


def expand(operands: Sequence[int], ops: Sequence[str]) -> list[tuple[int, str, int, int]]:
    """The trace's steps (left, op, right, value), one per line: an addition or subtraction as it stands, a
    multiplication by d as d - 1 additions of the running value."""
    steps, left = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == TIMES:
            base = left
            for _ in range(x - 1):
                steps.append((left, "+", base, left + base))
                left += base
            continue
        value = apply(left, op, x)
        steps.append((left, op, x, value))
        left = value
    return steps


def expression(operands: Sequence[int], ops: Sequence[str]) -> str:
    return str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:]))


def parse_expression(text: str) -> tuple[list[int], list[str]]:
    tokens = re.findall(r"\d+|[+\-*]", text.strip())
    return [int(t) for t in tokens[0::2]], tokens[1::2]


class ArithmeticTask:
    """Problem generator, reference solutions and programmatic teacher for the synthetic task."""

    source = "synthetic"

    def __init__(self, levels: Sequence[Level], seed: int = 1234, train_per_level: int = 2000,
                 test_per_level: int = 50, skill_levels: Sequence[Level] = (), max_multiplier: int = 3):
        if not levels:
            raise ValueError("the task needs at least one level")
        self.levels = [Level(int(lv.steps), int(lv.max_operand)) for lv in levels]
        self.plain_count = len(self.levels)
        self.levels += [Level(int(lv.steps), int(lv.max_operand), int(lv.times)) for lv in skill_levels]
        self.seed, self.train_per_level, self.test_per_level = seed, train_per_level, test_per_level
        self.max_multiplier = int(max_multiplier)
        self._splits: dict[str, list[Problem]] = {}

    @classmethod
    def from_config(cls, task_cfg) -> "ArithmeticTask":
        return cls([Level(lv.steps, lv.max_operand) for lv in task_cfg.levels], task_cfg.seed,
                   task_cfg.train_per_level, task_cfg.test_per_level,
                   [Level(lv.steps, lv.max_operand, lv.times) for lv in task_cfg.skill_levels],
                   task_cfg.max_multiplier)

    def plain(self) -> "ArithmeticTask":
        """The task without its skill levels (what the base model is warmed up on): the same problems there."""
        return ArithmeticTask(self.levels[:self.plain_count], self.seed, self.train_per_level, self.test_per_level)

    def is_skill(self, level: int) -> bool:
        return level > self.plain_count

    # ----------------------------------------------------------------- problems
    def draw(self, level: int, rng: random.Random) -> tuple[list[int], list[str]]:
        spec = self.levels[level - 1]
        operands = [rng.randint(1, spec.max_operand)]
        ops: list[str] = []
        value = operands[0]
        times = set(rng.sample(range(spec.steps), min(spec.times, spec.steps))) if spec.times else set()
        for i in range(spec.steps):
            if i in times:  # the skill: the running value times a digit
                x, op = rng.randint(2, self.max_multiplier), TIMES
            else:
                x, op = rng.randint(1, spec.max_operand), rng.choice("+-")
                if op == "-" and x > value:
                    op = "+"
            value = apply(value, op, x)
            operands.append(x)
            ops.append(op)
        return operands, ops

    def problem(self, operands: Sequence[int], ops: Sequence[str], level: int, pid: str) -> Problem:
        expr = expression(operands, ops)
        answer = str(evaluate(operands, ops)[-1])
        return Problem(id=pid, prompt=expr, answer=answer, source=self.source,
                       solution=self.reference_solution(expr), teacher_traces=[self.trace(expr)],
                       level=str(level), meta={"level": level, **({"skill": True} if self.is_skill(level) else {})})

    def split(self, name: str) -> list[Problem]:
        """'train' or 'test': deterministic from the task seed; train never repeats a test expression."""
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r} of the synthetic task (train | test)")
        if name not in self._splits:
            test = self._draw_split("test", self.test_per_level, exclude=set())
            self._splits["test"] = test
            self._splits["train"] = self._draw_split("train", self.train_per_level,
                                                     exclude={p.prompt for p in test})
        return self._splits[name]

    def _draw_split(self, name: str, per_level: int, exclude: set[str]) -> list[Problem]:
        problems = []
        for level in range(1, len(self.levels) + 1):
            rng = random.Random(f"{self.seed}-{name}-{level}")
            seen: set[str] = set()
            attempts = 0
            while len(seen) < per_level and attempts < per_level * 50:
                attempts += 1
                operands, ops = self.draw(level, rng)
                expr = expression(operands, ops)
                if expr in exclude or expr in seen:
                    continue
                seen.add(expr)
                problems.append(self.problem(operands, ops, level, f"arith-{name}-L{level}-{len(seen) - 1:05d}"))
        return problems

    def sample(self, level: int, rng: random.Random, exclude: set[str]) -> Problem:
        """A fresh problem of a level that is not in ``exclude`` (used by the warm-up stream)."""
        while True:
            operands, ops = self.draw(level, rng)
            if expression(operands, ops) not in exclude:
                return self.problem(operands, ops, level, f"arith-stream-L{level}")

    # ----------------------------------------------------------------- solutions
    @staticmethod
    def trace(expr: str) -> str:
        """The teacher's full step-by-step trace."""
        operands, ops = parse_expression(expr)
        lines = [f"{left}{op}{x}={value}" for left, op, x, value in expand(operands, ops)]
        return "\n".join(lines) + f"\n{ANSWER_MARK} {evaluate(operands, ops)[-1]}"

    @staticmethod
    def chunked_trace(expr: str, sizes: Sequence[int]) -> str:
        """A trace that does ``sizes[i]`` operations on line i (``17+5-9=13``): correct, but coarser than the
        one-operation steps of :meth:`trace` -- how a large model skips steps a small one needs."""
        operands, ops = parse_expression(expr)
        steps = expand(operands, ops)
        if sum(sizes) != len(steps) or min(sizes, default=1) < 1:
            raise ValueError(f"chunk sizes {list(sizes)} do not cover the {len(steps)} steps of {expr}")
        lines, i = [], 0
        for size in sizes:
            chunk = steps[i:i + size]
            lines.append(f"{chunk[0][0]}" + "".join(f"{op}{x}" for _, op, x, _ in chunk) + f"={chunk[-1][3]}")
            i += size
        return "\n".join(lines) + f"\n{ANSWER_MARK} {evaluate(operands, ops)[-1]}"

    @staticmethod
    def steps_of(expr: str) -> int:
        """Lines of the trace (a multiplication by d takes d - 1)."""
        return len(expand(*parse_expression(expr)))

    @staticmethod
    def reference_solution(expr: str) -> str:
        """The short human-style solution: the result with no intermediate steps."""
        operands, ops = parse_expression(expr)
        return f"{expr} = {evaluate(operands, ops)[-1]}\n{ANSWER_MARK} {evaluate(operands, ops)[-1]}"

    @staticmethod
    def final_answer(completion: str) -> Optional[str]:
        """The integer after the first ``####`` (what the model commits to), or None."""
        match = _FINAL.search(completion)
        return match.group(1) if match else None

    def first_error(self, expr: str, solution: str) -> Optional[StepError]:
        """The first wrong step of ``solution`` to ``expr``; None if the solution is fully correct."""
        operands, ops = parse_expression(expr)
        values = evaluate(operands, ops)
        body = solution.split(ANSWER_MARK, 1)[0]
        lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
        for i, (left, op, x, value) in enumerate(expand(operands, ops)):
            expected = f"{left}{op}{x}={value}"
            if i >= len(lines):
                return StepError(i, "missing_step", "", expected, value)
            match = _STEP.match(lines[i])
            if not match or (int(match.group(1)), match.group(2), int(match.group(3))) != (left, op, x):
                return StepError(i, "wrong_operands", lines[i], expected, value)
            if int(match.group(4)) != value:
                return StepError(i, "wrong_value", lines[i], expected, value)
        final = self.final_answer(solution)
        expected_final = f"{ANSWER_MARK} {values[-1]}"
        if final is None:
            return StepError(len(values), "no_answer", "", expected_final, values[-1])
        if int(final) != values[-1]:
            return StepError(len(values), "wrong_final", f"{ANSWER_MARK} {final}", expected_final, values[-1])
        return None

    def max_new_tokens(self) -> int:
        """Enough tokens for the longest trace of any level (digits are one token each)."""
        plain = self.levels[:self.plain_count]
        longest = max(plain, key=lambda lv: lv.steps * len(str(lv.max_operand)))
        digits = len(str(longest.max_operand * (longest.steps + 1)))
        per_step = 2 * digits + len(str(longest.max_operand)) + 3
        budget = longest.steps * per_step + digits + 8
        for lv in self.levels[self.plain_count:]:  # a product is written out: more lines, larger values
            lines = lv.steps + lv.times * (self.max_multiplier - 2)
            digits = len(str(lv.max_operand * (lv.steps + 1) * self.max_multiplier ** lv.times))
            budget = max(budget, lines * (3 * digits + 3) + digits + 8)
        return budget
