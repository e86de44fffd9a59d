"""Graded rollouts as records, and the small interface a phase hands them to.

Every phase that samples and grades (profile, grpo) produces one :class:`RolloutRecord` per graded
completion and hands them to a :class:`RolloutSink`: the difficulty ledger (:mod:`stagewise_pl.ledger`),
or :class:`NullSink` for a phase run on its own (benchmarks, the tiny model's warm-up).

Resume: a run killed after writing records for rollout step s but before its checkpoint resumes
at an earlier step and samples those steps again. ``rewind(phase, step)`` drops the records of
``phase`` from ``step`` on, so nothing is recorded twice and nothing is lost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Protocol, Sequence


@dataclass
class RolloutRecord:
    phase: str  # the phase's name in the plan
    phase_kind: str  # grpo, profile, ...
    step: int  # rollout step within the phase (0-based)
    problem_id: str
    sample_index: int  # 0..G-1 within the problem's group
    reward: float
    reason: str  # the verdict's reason (correct, wrong, no_answer, timeout, ...)
    completion_tokens: int
    truncated: bool  # stopped at the generation budget, not at EOS
    zero_group: bool  # every sample of this problem's group got reward 0 in this step
    completion: Optional[str] = None  # the text: kept for failures (reward 0); in profiles also for correct
    # ones when data.replay_target=own (replay trains on them)
    round: int = 0  # generation round within the step (dynamic sampling adds rounds)
    phase_index: int = 0  # the phase's place in the plan (1-based)
    global_step: int = 0  # optimizer steps of the phase's trainer when the rollout was graded

    def to_dict(self) -> dict:
        return asdict(self)


class RolloutSink(Protocol):
    """Where graded rollouts go. The difficulty ledger implements this."""

    def record(self, records: Sequence[RolloutRecord]) -> None: ...

    def rewind(self, phase: str, step: int) -> None: ...


class NullSink:
    """Records go nowhere (a phase run outside a run directory)."""

    def record(self, records: Sequence[RolloutRecord]) -> None:
        pass

    def rewind(self, phase: str, step: int) -> None:
        pass
