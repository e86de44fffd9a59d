"""Graded rollouts as records, and the small interface a phase hands them to.

Every phase that samples and grades (GRPO now; profiling later) produces one
:class:`RolloutRecord` per graded completion and hands them to a :class:`RolloutSink`. The
difficulty ledger implements this interface; until it exists, :class:`ZeroRewardLog` keeps the
records of all-zero groups (problems the policy never solved in a rollout batch, the input of
critique fine-tuning) in a JSONL file under the run directory.

Resume: a run killed after writing records for rollout step s but before its checkpoint resumes
at an earlier step and samples those steps again. ``rewind(phase, step)`` drops the records of
``phase`` from ``step`` on, so nothing is recorded twice and nothing is lost.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
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
    def record(self, records: Sequence[RolloutRecord]) -> None:
        pass

    def rewind(self, phase: str, step: int) -> None:
        pass


class ZeroRewardLog:
    """Keeps the records of all-zero groups in a JSONL file, one record per line.

    Appends are flushed and fsynced; a line cut short by a crash is ignored when read back and
    dropped by the next ``rewind``. ``rewind`` rewrites the file atomically (temporary file, fsync,
    rename).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, records: Sequence[RolloutRecord]) -> None:
        lines = [json.dumps(r.to_dict()) + "\n" for r in records if r.zero_group]
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the tail of a write cut by a crash
                continue
        return out

    def rewind(self, phase: str, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if not (r["phase"] == phase and r["step"] >= step)]
        from stagewise_pl.run import atomic_write

        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def never_solved(self, phase: str) -> set[str]:
        """Problems that had an all-zero group in ``phase`` (CFT's input)."""
        return {r["problem_id"] for r in self.read() if r["phase"] == phase}
