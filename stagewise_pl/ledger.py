"""The difficulty ledger: every graded rollout of a run, append-only, as Parquet under the run directory.

Layout: ``<run>/ledger/part-000000.parquet``, ``part-000001.parquet``, ... Each :meth:`record` call
writes one new part: to a temporary file in the same directory, fsynced, then renamed into place
(and the directory fsynced), so a reader sees a whole part or none, never half of one. Parts are
never rewritten; the ledger's position is the number of parts, which :meth:`state_dict` returns
for the checkpoint. Resuming from a checkpoint calls :meth:`load_state_dict`, which deletes the
parts written after it (the resumed run is about to record those rollouts again): nothing is
recorded twice and nothing a checkpoint counts is lost. ``rewind(phase, step)`` (the
:class:`~stagewise_pl.records.RolloutSink` interface) does the same by content, for callers that
know a step rather than a position.

Queries: pass rate per problem in a phase, a problem's history across phases, the problems never
solved in a phase. A pass is a verdict ``correct``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from stagewise_pl.faults import fault_point
from stagewise_pl.io import atomic_file, fsync_dir
from stagewise_pl.records import RolloutRecord

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("phase", pa.string()), ("phase_index", pa.int32()), ("phase_kind", pa.string()),
    ("step", pa.int64()), ("global_step", pa.int64()), ("problem_id", pa.string()), ("sample_index", pa.int32()),
    ("reward", pa.float64()), ("reason", pa.string()), ("completion_tokens", pa.int32()), ("truncated", pa.bool_()),
    ("zero_group", pa.bool_()), ("completion", pa.string()), ("round", pa.int32()),
])


class DifficultyLedger:
    """Append-only store of graded rollouts; implements :class:`~stagewise_pl.records.RolloutSink`."""

    def __init__(self, directory: Path, run_id: str, writer: bool = True):
        self.dir, self.run_id = Path(directory), run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        if writer:  # the process that writes (rank 0) clears what a crash left half-written
            for stale in self.dir.glob(".part-*.tmp*"):  # a write cut by a crash before its rename
                stale.unlink(missing_ok=True)
        self._table: Optional[pa.Table] = None

    # ------------------------------------------------------------------ writing
    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def record(self, records: Sequence[RolloutRecord]) -> None:
        if not records:
            return
        rows = {name: [] for name in SCHEMA.names}
        for r in records:
            values = asdict(r)
            for name in SCHEMA.names:
                rows[name].append(self.run_id if name == "run_id" else values[name])
        table = pa.table(rows, schema=SCHEMA)
        path = self.dir / f"part-{len(self.parts()):06d}.parquet"
        with atomic_file(path, "wb", before_rename=lambda: fault_point("ledger_rename")) as handle:
            pq.write_table(table, handle)
        self._table = None

    # ------------------------------------------------------------------ position (checkpoints)
    def state_dict(self) -> dict:
        return {"parts": len(self.parts())}

    def load_state_dict(self, state: dict) -> None:
        """Back to the position a checkpoint recorded: parts written after it are removed."""
        keep = int(state["parts"])
        parts = self.parts()
        if len(parts) < keep:
            raise RuntimeError(f"ledger {self.dir} has {len(parts)} parts but the checkpoint counts {keep}: "
                               f"parts are missing")
        for extra in parts[keep:]:
            extra.unlink()
        fsync_dir(self.dir)
        self._table = None

    def rewind(self, phase: str, step: int) -> None:
        """Drop the records of ``phase`` from rollout step ``step`` on (RolloutSink). Parts are whole
        calls of :meth:`record`, one rollout step each, so whole trailing parts are removed."""
        parts = self.parts()
        keep = len(parts)
        while keep > 0:
            t = pq.read_table(parts[keep - 1], columns=["phase", "step"])
            if not any(p == phase and s >= step for p, s in zip(t["phase"].to_pylist(), t["step"].to_pylist())):
                break
            keep -= 1
        if keep < len(parts):
            self.load_state_dict({"parts": keep})

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Forget the cached table (another process may have written parts)."""
        self._table = None

    def table(self) -> pa.Table:
        if self._table is None:
            parts = self.parts()
            self._table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SCHEMA.empty_table()
        return self._table

    def __len__(self) -> int:
        return self.table().num_rows

    def _rows(self, columns: list[str]) -> list[dict]:
        return self.table().select(columns).to_pylist()

    def pass_rates(self, phase: str) -> "OrderedDict[str, float]":
        """Problem id -> fraction of its graded rollouts in ``phase`` that were correct."""
        counts: "OrderedDict[str, list[int]]" = OrderedDict()
        for row in self._rows(["phase", "problem_id", "reason"]):
            if row["phase"] == phase:
                c = counts.setdefault(row["problem_id"], [0, 0])
                c[0] += row["reason"] == "correct"
                c[1] += 1
        return OrderedDict((pid, ok / n) for pid, (ok, n) in counts.items())

    def tally(self, problems, phases=None, first_index: int = 0, last_index: Optional[int] = None,
              global_step: Optional[int] = None) -> dict[str, list]:
        """Problem id -> [correct, graded, phases] over the rows of ``problems`` (None = any) whose phase is in
        ``phases`` (None = any), whose plan position lies in [first_index, last_index] and, given ``global_step``,
        graded at that optimizer step (under the same policy)."""
        wanted, out = None if problems is None else set(problems), {}
        for row in self._rows(["phase", "phase_index", "problem_id", "reason", "global_step"]):
            if (wanted is not None and row["problem_id"] not in wanted) or (phases is not None
                                                                            and row["phase"] not in phases):
                continue
            if row["phase_index"] < first_index or (last_index is not None and row["phase_index"] > last_index):
                continue
            if global_step is not None and row["global_step"] != global_step:
                continue
            entry = out.setdefault(row["problem_id"], [0, 0, []])
            entry[0] += row["reason"] == "correct"
            entry[1] += 1
            if row["phase"] not in entry[2]:
                entry[2].append(row["phase"])
        return out

    def tokens_by_phase(self) -> "OrderedDict[str, dict]":
        """Phase -> rollouts graded and completion tokens generated in it (a run's generation budget)."""
        out: "OrderedDict[str, dict]" = OrderedDict()
        for row in self._rows(["phase", "completion_tokens"]):
            entry = out.setdefault(row["phase"], {"rollouts": 0, "tokens": 0})
            entry["rollouts"] += 1
            entry["tokens"] += int(row["completion_tokens"])
        return out

    def history(self, problem_id: str) -> list[dict]:
        """One entry per phase the problem was graded in, in order: phase, kind, rollouts, pass rate."""
        out: "OrderedDict[str, dict]" = OrderedDict()
        for row in self._rows(["phase", "phase_index", "phase_kind", "problem_id", "reason"]):
            if row["problem_id"] != problem_id:
                continue
            entry = out.setdefault(row["phase"], {"phase": row["phase"], "phase_index": row["phase_index"],
                                                  "phase_kind": row["phase_kind"], "rollouts": 0, "correct": 0})
            entry["rollouts"] += 1
            entry["correct"] += row["reason"] == "correct"
        return [dict(e, pass_rate=e["correct"] / e["rollouts"]) for e in out.values()]

    def never_solved(self, phase: str) -> list[str]:
        """Problems graded in ``phase`` with no correct rollout there (critique fine-tuning's input)."""
        return [pid for pid, rate in self.pass_rates(phase).items() if rate == 0.0]

    def failures_by_problem(self, phase: str) -> "OrderedDict[str, list[str]]":
        """Problem id -> the texts of its failed rollouts in ``phase`` (one pass over the ledger)."""
        out: "OrderedDict[str, list[str]]" = OrderedDict()
        for row in self._rows(["phase", "problem_id", "reward", "completion"]):
            if row["phase"] == phase and row["reward"] <= 0 and row["completion"] is not None:
                out.setdefault(row["problem_id"], []).append(row["completion"])
        return out

    def correct_by_problem(self, phase: str) -> "OrderedDict[str, list[str]]":
        """Problem id -> the texts of its correct rollouts in ``phase`` (profiles keep them with
        data.replay_target=own)."""
        out: "OrderedDict[str, list[str]]" = OrderedDict()
        for row in self._rows(["phase", "problem_id", "reward", "completion"]):
            if row["phase"] == phase and row["reward"] > 0 and row["completion"] is not None:
                out.setdefault(row["problem_id"], []).append(row["completion"])
        return out

    def failures(self, phase: str, problem_id: str) -> list[str]:
        """The texts of a problem's failed rollouts in ``phase``."""
        return [row["completion"] for row in self._rows(["phase", "problem_id", "reward", "completion"])
                if row["phase"] == phase and row["problem_id"] == problem_id and row["reward"] <= 0
                and row["completion"] is not None]
