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
solved in a phase. A pass is a verdict ``correct``. They read an index kept between calls: the routing columns of
each part (problem ids and phases as int32 codes, no completions), read once per part, so a query after a step
reads only that step's part, and answered with Arrow's group-by, not Python rows; the completions a phase needs
(critique fine-tuning's failures, self-replay's correct rollouts) are read only from the parts that hold that
phase, three columns, filtered in the reader. The writer keeps the index on disk too, in segments of 256 parts
(``ledger/.index``), so a cold process opens a few files, not one per step. ``tools/bench_ledger.py`` measures
them at 10 million rollouts.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stagewise_pl.faults import fault_point
from stagewise_pl.io import atomic_file, atomic_write, fsync_dir
from stagewise_pl.ledger_index import LedgerIndex
from stagewise_pl.records import RolloutRecord

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("phase", pa.string()), ("phase_index", pa.int32()), ("phase_kind", pa.string()),
    ("step", pa.int64()), ("global_step", pa.int64()), ("problem_id", pa.string()), ("sample_index", pa.int32()),
    ("reward", pa.float64()), ("reason", pa.string()), ("completion_tokens", pa.int32()), ("truncated", pa.bool_()),
    ("zero_group", pa.bool_()), ("completion", pa.string()), ("round", pa.int32()),
])


ROLLED_BACK = "rolled_back.json"  # the phases a gate rolled back (stagewise_pl.routing.gate)


class DifficultyLedger:
    """Append-only store of graded rollouts; implements :class:`~stagewise_pl.records.RolloutSink`."""

    def __init__(self, directory: Path, run_id: str, writer: bool = True):
        self.dir, self.run_id = Path(directory), run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        if writer:  # the process that writes (rank 0) clears what a crash left half-written
            for stale in [*self.dir.glob(".part-*.tmp*"), *self.dir.glob(".index/.seg-*.tmp*")]:
                stale.unlink(missing_ok=True)  # a write cut by a crash before its rename
        self._index = LedgerIndex(self.dir, writer)
        self._pairs_cache, self._pairs_of = None, None

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

    def mark_rolled_back(self, phase: str) -> None:
        """List ``phase`` as rolled back by a phase gate: its rows stay, read as from a phase whose weights are gone."""
        names = self.rolled_back()
        if phase not in names:
            atomic_write(self.dir / ROLLED_BACK, json.dumps(names + [phase]))

    def rolled_back(self) -> list[str]:
        """The phases a gate rolled back, in order."""
        path = self.dir / ROLLED_BACK
        return json.loads(path.read_text()) if path.is_file() else []

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
        self._index.drop_segments(keep)
        self._index.reset()

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
    def table(self) -> pa.Table:
        """Every column of every part, read now and not kept (tests, exports): the queries below read less."""
        parts = self.parts()
        return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SCHEMA.empty_table()

    def __len__(self) -> int:
        return self._view().num_rows

    def _view(self) -> pa.Table:
        """The routing columns of every part, problems and phases coded (:mod:`stagewise_pl.ledger_index`)."""
        return self._index.sync(self.parts())

    def _select(self, problems=None, phases=None, first_index: int = 0, last_index: Optional[int] = None,
                global_step: Optional[int] = None) -> pa.Table:
        t, idx = self._view(), self._index
        masks = []
        if problems is not None:
            masks.append(pc.is_in(t["problem"], value_set=idx.problems.codes(problems)))
        if phases is not None:
            masks.append(pc.is_in(t["phase"], value_set=idx.phases.codes(phases)))
        if first_index > 0:
            masks.append(pc.greater_equal(t["phase_index"], first_index))
        if last_index is not None:
            masks.append(pc.less_equal(t["phase_index"], last_index))
        if global_step is not None:
            masks.append(pc.equal(t["global_step"], global_step))
        if not masks:
            return t
        mask = masks[0]
        for more in masks[1:]:
            mask = pc.and_(mask, more)
        return t.filter(mask)

    def _counts(self, t: pa.Table, keys: list[str]) -> list[dict]:
        """Correct and graded rollouts per group of ``keys``, groups in order of first appearance."""
        g = t.group_by(keys, use_threads=False).aggregate([("correct", "sum"), ("correct", "count")])
        return g.rename_columns(keys + ["correct", "n"]).to_pylist()

    def pass_rates(self, phase: str) -> "OrderedDict[str, float]":
        """Problem id -> fraction of its graded rollouts in ``phase`` that were correct."""
        groups = self._counts(self._select(phases=[phase]), ["problem"])
        name = self._index.problems.names
        return OrderedDict((name[g["problem"]], g["correct"] / g["n"]) for g in groups)

    def tally(self, problems, phases=None, first_index: int = 0, last_index: Optional[int] = None,
              global_step: Optional[int] = None) -> dict[str, list]:
        """Problem id -> [correct, graded, phases] over the rows of ``problems`` (None = any) whose phase is in
        ``phases`` (None = any), whose plan position lies in [first_index, last_index] and, given ``global_step``,
        graded at that optimizer step (under the same policy)."""
        t = self._select(problems, phases, first_index, last_index, global_step)
        out, problem, phase = {}, self._index.problems.names, self._index.phases.names
        for g in self._counts(t, ["problem", "phase"]):
            entry = out.setdefault(problem[g["problem"]], [0, 0, []])
            entry[0] += g["correct"]
            entry[1] += g["n"]
            entry[2].append(phase[g["phase"]])
        return out

    def tokens_by_phase(self) -> "OrderedDict[str, dict]":
        """Phase -> rollouts graded and completion tokens generated in it (a run's generation budget)."""
        g = self._view().group_by("phase", use_threads=False).aggregate([("tokens", "count"), ("tokens", "sum")])
        return OrderedDict((self._index.phases.names[c], {"rollouts": n, "tokens": int(tokens)})
                           for c, n, tokens in zip(*(g[col].to_pylist() for col in ("phase", "tokens_count",
                                                                                    "tokens_sum"))))

    def _pairs(self) -> pa.Table:
        """Correct and graded rollouts per (phase, problem), in order of first appearance: one group-by over the
        index, kept until a part is added (the report reads it for every phase and every profile's buckets)."""
        t = self._view()
        if self._pairs_of is not t:
            g = t.group_by(["phase", "problem"], use_threads=False).aggregate([("correct", "sum"),
                                                                                ("correct", "count")])
            self._pairs_cache, self._pairs_of = g.rename_columns(["phase", "problem", "correct", "n"]), t
        return self._pairs_cache

    def pass_rates_by_phase(self, phases) -> "OrderedDict[str, OrderedDict[str, float]]":
        """:meth:`pass_rates` of each of ``phases`` (those with rows), from one group-by."""
        pairs = self._pairs()
        pairs = pairs.filter(pc.is_in(pairs["phase"], value_set=self._index.phases.codes(phases)))
        out: "OrderedDict[str, OrderedDict[str, float]]" = OrderedDict()
        phase, problem = self._index.phases.names, self._index.problems.names
        for c, pid, ok, n in zip(*(pairs[col].to_pylist() for col in ("phase", "problem", "correct", "n"))):
            out.setdefault(phase[c], OrderedDict())[problem[pid]] = ok / n
        return out

    def phase_stats(self) -> list[dict]:
        """Per phase, in order: kind, rollouts, problems, pass rate, share of problems never solved, mean
        completion tokens, share truncated (the report's ledger table)."""
        per_phase = self._view().group_by("phase", use_threads=False).aggregate(
            [("correct", "sum"), ("correct", "count"), ("tokens", "sum"), ("truncated", "sum")]).to_pylist()
        pairs = self._pairs()
        pairs = pairs.append_column("unsolved", pc.equal(pairs["correct"], 0))
        unsolved = {g["phase"]: g for g in pairs.group_by("phase", use_threads=False).aggregate(
            [("unsolved", "sum"), ("unsolved", "count")]).to_pylist()}
        out = []
        for g in per_phase:
            name, n, u = self._index.phases.names[g["phase"]], g["correct_count"], unsolved[g["phase"]]
            out.append({"phase": name, "kind": self._index.kinds[name], "rollouts": n,
                        "problems": u["unsolved_count"], "pass_rate": g["correct_sum"] / n,
                        "never_solved": u["unsolved_sum"] / u["unsolved_count"],
                        "completion_tokens": g["tokens_sum"] / n, "truncated": g["truncated_sum"] / n})
        return out

    def history(self, problem_id: str) -> list[dict]:
        """One entry per phase the problem was graded in, in order: phase, kind, rollouts, pass rate."""
        t = self._select(problems=[problem_id])
        g = t.group_by("phase", use_threads=False).aggregate([("correct", "sum"), ("correct", "count"),
                                                              ("phase_index", "min")])
        out = []
        for c, ok, n, index in zip(*(g[col].to_pylist() for col in ("phase", "correct_sum", "correct_count",
                                                                    "phase_index_min"))):
            name = self._index.phases.names[c]
            out.append({"phase": name, "phase_index": index, "phase_kind": self._index.kinds[name], "rollouts": n,
                        "correct": ok, "pass_rate": ok / n})
        return out

    def never_solved(self, phase: str) -> list[str]:
        """Problems graded in ``phase`` with no correct rollout there (critique fine-tuning's input)."""
        return [pid for pid, rate in self.pass_rates(phase).items() if rate == 0.0]

    def _texts(self, phase: str, correct: bool, problem_id: Optional[str] = None) -> "OrderedDict[str, list[str]]":
        """Problem id -> the completions of ``phase`` with reward > 0 (``correct``) or <= 0: only the parts that
        hold the phase are opened, only three columns read, the rest filtered in the reader."""
        self._view()
        where = [("phase", "=", phase), ("reward", ">" if correct else "<=", 0.0)]
        if problem_id is not None:
            where.append(("problem_id", "=", problem_id))
        out: "OrderedDict[str, list[str]]" = OrderedDict()
        for part in self._index.parts_with(phase):
            t = pq.read_table(part, columns=["problem_id", "completion"], filters=where)
            for pid, text in zip(t["problem_id"].to_pylist(), t["completion"].to_pylist()):
                if text is not None:
                    out.setdefault(pid, []).append(text)
        return out

    def failures_by_problem(self, phase: str) -> "OrderedDict[str, list[str]]":
        """Problem id -> the texts of its failed rollouts in ``phase`` (one pass over the ledger)."""
        return self._texts(phase, correct=False)

    def correct_by_problem(self, phase: str) -> "OrderedDict[str, list[str]]":
        """Problem id -> the texts of its correct rollouts in ``phase`` (profiles keep them with
        data.replay_target=own)."""
        return self._texts(phase, correct=True)

    def failures(self, phase: str, problem_id: str) -> list[str]:
        """The texts of a problem's failed rollouts in ``phase``."""
        return self._texts(phase, correct=False, problem_id=problem_id).get(problem_id, [])
