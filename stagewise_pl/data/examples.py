"""Problems to SFT examples: the target a problem teaches, rendered with the chat template, the prompt masked."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

from stagewise_pl.data.problems import Problem
from stagewise_pl.data.sft import Example, example_from_ids
from stagewise_pl.models.load import PromptRenderer


def sft_target(problem: Problem, target: str, answer_line: str = "") -> str:
    """The completion to learn: the first teacher trace, or the dataset's reference solution (its final ``#### N``
    line rendered as ``answer_line`` when one is given, as the dataset teacher renders it)."""
    if target == "teacher_trace":
        if not problem.teacher_traces:
            raise ValueError(f"problem {problem.id} has no teacher trace (data.target=teacher_trace)")
        return problem.teacher_traces[0]
    if not problem.solution:
        raise ValueError(f"problem {problem.id} has no reference solution (data.target=reference)")
    if answer_line:
        from stagewise_pl.teachers.dataset import render_solution

        return render_solution(problem.solution, problem.answer, answer_line)
    return problem.solution


def build_examples(tokenizer, problems: Sequence[Problem], target: str, max_length: int,
                   render: Optional[Callable[[str], str]] = None) -> list[Example]:
    return encode_pairs(tokenizer, [(p.prompt, sft_target(p, target)) for p in problems], max_length, render)


def encode_pairs(tokenizer, pairs: Sequence[tuple], max_length: int,
                 render: Optional[Callable[[str], str]] = None) -> list[Example]:
    """(user message, completion[, loss weight]) -> chat-rendered examples (``render``: the run's
    :class:`PromptRenderer`; default the chat template without a system prompt); warns about truncated ones."""
    if not pairs:
        return []
    render = render or PromptRenderer(tokenizer)
    # one tokenizer call per side for the whole list (a fast tokenizer encodes a batch in one pass: the same ids as
    # one call per text, without the per-call overhead that dominated the start of a run on a 10 000-problem pool)
    prompts = tokenizer([render(prompt) for prompt, *_ in pairs], add_special_tokens=False)
    completions = tokenizer([completion for _, completion, *_ in pairs], add_special_tokens=False)
    examples = [example_from_ids(p, c, tokenizer.eos_token_id, max_length, *weight)
                for p, c, (_, _, *weight) in zip(prompts["input_ids"], completions["input_ids"], pairs)]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        warnings.warn(f"{truncated} of {len(examples)} SFT examples were longer than trainer.max_length="
                      f"{max_length} and were truncated")
    return examples
