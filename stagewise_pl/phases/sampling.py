"""The one sampling seam: every kind that samples the student and grades what it wrote goes through
:func:`sample_and_grade` (profile, grpo, hpt, relift, luffy, hinted, and kinds of yours), and gets :class:`Groups` back.

A call renders each problem's prompt (the run's :class:`~stagewise_pl.models.load.PromptRenderer`: chat template and
system prompt), asks the rollout engine for ``sampling.n`` completions of each, grades every completion against its
problem's gold answer with the verifier, and returns them prompt-major (``n`` per problem) with their rewards (a
verifier's NaN/inf reward counts as 0, and is counted), finish reasons and wall times. What a kind does around it
-- seeds, which problems, several rounds, sharding across ranks, pushing weights into an engine with its own copy
-- stays the kind's: a call is one generation and one grading.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from stagewise_pl.data.problems import Problem


@dataclass
class Groups:
    """Graded groups of one rollout step (prompt-major, like RolloutBatch)."""

    problems: list[Problem]
    prompt_ids: list[list[int]]  # one per prompt
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    rewards: torch.Tensor  # (P, G)
    reasons: list[str]
    rounds: list[int]  # generation round of each prompt
    seconds_generation: float = 0.0  # wall time of the engine's call(s)
    seconds_grading: float = 0.0  # wall time of the verifier's call(s)
    nonfinite: int = 0  # rewards the verifier gave as NaN/inf, counted as 0
    # the engine's log-prob of each sampled token (one list per completion), when the sampling asked for them
    logprobs: Optional[list[list[float]]] = None

    @staticmethod
    def concat(parts: Sequence["Groups"]) -> "Groups":
        logprobs = [x for g in parts for x in g.logprobs] if all(g.logprobs is not None for g in parts) else None
        return Groups([p for g in parts for p in g.problems], [x for g in parts for x in g.prompt_ids],
                      [x for g in parts for x in g.completion_ids], [x for g in parts for x in g.texts],
                      [x for g in parts for x in g.truncated], torch.cat([g.rewards for g in parts]),
                      [x for g in parts for x in g.reasons], [x for g in parts for x in g.rounds],
                      sum(g.seconds_generation for g in parts), sum(g.seconds_grading for g in parts),
                      sum(g.nonfinite for g in parts), logprobs)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def select(self, keep: list[int]) -> "Groups":
        g = self.rewards.shape[1]
        rows = [i * g + j for i in keep for j in range(g)]
        return Groups([self.problems[i] for i in keep], [self.prompt_ids[i] for i in keep],
                      [self.completion_ids[r] for r in rows], [self.texts[r] for r in rows],
                      [self.truncated[r] for r in rows], self.rewards[keep], [self.reasons[r] for r in rows],
                      [self.rounds[i] for i in keep], self.seconds_generation, self.seconds_grading, self.nonfinite,
                      None if self.logprobs is None else [self.logprobs[r] for r in rows])

    def records(self, spec, kind: str, step: int, global_step: int) -> list:
        """The ledger rows of these groups, graded at rollout ``step`` of phase ``spec`` (of ``kind``)."""
        from stagewise_pl.records import RolloutRecord

        g, out = self.rewards.shape[1], []
        for i, problem in enumerate(self.problems):
            zero = bool((self.rewards[i] <= 0).all())
            for j in range(g):
                r, reward = i * g + j, float(self.rewards[i, j])
                out.append(RolloutRecord(
                    phase=spec.name, phase_kind=kind, step=step, problem_id=problem.id, sample_index=j, reward=reward,
                    reason=self.reasons[r], completion_tokens=len(self.completion_ids[r]),
                    truncated=self.truncated[r], zero_group=zero, completion=self.texts[r] if reward <= 0 else None,
                    round=self.rounds[i], phase_index=spec.number, global_step=global_step))
        return out


def informative(rewards: torch.Tensor) -> list[int]:
    """Indices of groups whose rewards are not all equal."""
    return (rewards.max(-1).values > rewards.min(-1).values).nonzero()[:, 0].tolist()



def sample_and_grade(engine, verifier, render: Callable[[str], str], problems: Sequence[Problem], sampling,
                     round_: int = 0, desc: str = "generate") -> Groups:
    """``sampling.n`` graded completions of each of ``problems`` (a ``SamplingParams``), from ``engine`` (sampling
    from the policy as it is: push the weights first into an engine with its own copy) and ``verifier``."""
    problems = list(problems)
    n = sampling.n
    t0 = time.perf_counter()
    batch = engine.generate([render(p.prompt) for p in problems], sampling, desc=desc)
    t1 = time.perf_counter()
    verdicts = verifier.score_batch(batch.texts, [p.answer for p in problems for _ in range(n)])
    t2 = time.perf_counter()
    rewards, nonfinite = [], 0
    for v in verdicts:
        r = float(v.reward)
        if not math.isfinite(r):  # a verifier's NaN/inf: 0, and counted
            nonfinite += 1
            r = 0.0
        rewards.append(r)
    return Groups(problems, batch.prompt_ids, batch.completion_ids, batch.texts,
                  [f == "length" for f in batch.finish_reasons],
                  torch.tensor(rewards, dtype=torch.float32).view(len(problems), n), [v.reason for v in verdicts],
                  [round_] * len(problems), t1 - t0, t2 - t1, nonfinite, batch.logprobs)
