"""The difficulty ledger's index: what its queries read, kept in memory between them and on disk between processes.

For each part of the ledger, its routing columns: phase, plan position, problem, whether correct, optimizer step,
completion tokens, truncated (no completions); problem ids and phase names as int32 codes, in order of first
appearance. A process reads each part once (a query after a rollout step reads only that step's part) and answers
with Arrow's group-by, not Python rows.

A run's ledger holds one part per rollout step, tens of thousands at GPU scale, and opening that many files is what
a cold process (a resume, the report) would pay. So the writing process also keeps **segments**: every
``SEGMENT_PARTS`` parts, their rows in one file ``<ledger>/.index/seg-FIRST-LAST.parquet`` with the stamp (inode,
size, mtime) of each part it covers. A cold process reads the segments whose parts are unchanged, then the parts
after them. A segment is a cache: one whose parts were removed or rewritten (a resume to an earlier checkpoint) is
not read, and the writer deletes it; one it cannot write (a full disk) is warned about and skipped, as the parts
are the record.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stagewise_pl.io import atomic_file

SEGMENT_PARTS = 256
COLUMNS = ["phase", "phase_index", "phase_kind", "problem_id", "reason", "global_step", "completion_tokens",
           "truncated"]
STRINGS = ["phase", "phase_kind", "problem_id"]
META = b"stagewise_index"


class Codes:
    """Strings as int32 codes, in order of first appearance (problem ids, phase names)."""

    def __init__(self):
        self.names: list[str] = []
        self._code: dict[str, int] = {}

    def encode(self, column) -> pa.Array:
        encoded = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if not pa.types.is_dictionary(encoded.type):
            encoded = encoded.dictionary_encode()
        mapping = [self._code_of(s) for s in encoded.dictionary.to_pylist()]
        return pc.take(pa.array(mapping, pa.int32()), encoded.indices)

    def _code_of(self, name: str) -> int:
        code = self._code.get(name)
        if code is None:
            code = self._code[name] = len(self.names)
            self.names.append(name)
        return code

    def codes(self, names) -> pa.Array:
        return pa.array([self._code[s] for s in names if s in self._code], pa.int32())


def stamp(part: Path) -> list:
    st = part.stat()  # a part is written to a new file and renamed: a rewritten part has another inode
    return [part.name, st.st_ino, st.st_size, st.st_mtime_ns]


def _phases_of(t: pa.Table) -> list[list[str]]:
    """The (phase, kind) pairs of one part's rows (one pair for every part a phase writes)."""
    phase, kind = (t[c].combine_chunks() for c in ("phase", "phase_kind"))
    if len(phase.dictionary) == 1 and len(kind.dictionary) == 1 and t.num_rows:
        return [[phase.dictionary[0].as_py(), kind.dictionary[0].as_py()]]
    pairs = t.group_by(["phase", "phase_kind"], use_threads=False).aggregate([]).to_pylist()
    return [[str(p["phase"]), str(p["phase_kind"])] for p in pairs]


class LedgerIndex:
    """The coded routing columns of a ledger directory's parts, read incrementally (see the module's text)."""

    def __init__(self, directory: Path, writer: bool):
        self.dir, self.writer = Path(directory), writer
        self.segments = self.dir / ".index"
        self.reset()

    def reset(self) -> None:
        self.problems, self.phases = Codes(), Codes()
        self.kinds: dict[str, str] = {}
        self.seen: list[list] = []  # stamp of each part read, in order
        self.part_phases: list[set[str]] = []
        self.chunks: list[pa.Table] = []
        self.pending: list[tuple] = []  # (raw rows, phase pairs) of the parts after the last segment
        self._table: Optional[pa.Table] = None

    # ------------------------------------------------------------------ keeping up with the parts
    def sync(self, parts: list[Path]) -> pa.Table:
        try:
            fresh = len(parts) >= len(self.seen) and all(stamp(p) == s for p, s in zip(parts, self.seen))
        except FileNotFoundError:
            fresh = False
        if not fresh:
            self.reset()
        if not self.seen:
            self._load_segments(parts)
        for part in parts[len(self.seen):]:
            self._add(pq.read_table(part, columns=COLUMNS, read_dictionary=STRINGS), [stamp(part)])
        return self.table()

    def _add(self, raw: pa.Table, stamps: list[list], phases: Optional[list[list[list[str]]]] = None) -> None:
        """Rows of one part (or of a segment's parts, ``phases`` giving each part's (phase, kind) pairs) into the
        index."""
        per_part = phases if phases is not None else [_phases_of(raw)]
        for pairs in per_part:
            for phase, kind in pairs:
                self.kinds.setdefault(phase, kind)
            self.part_phases.append({phase for phase, _ in pairs})
        self.chunks.append(pa.table({
            "phase": self.phases.encode(raw["phase"]), "phase_index": raw["phase_index"].combine_chunks(),
            "problem": self.problems.encode(raw["problem_id"]),
            "correct": (raw["correct"].combine_chunks() if "correct" in raw.column_names else
                        pc.equal(raw["reason"].combine_chunks().cast(pa.string()), "correct")),
            "global_step": raw["global_step"].combine_chunks(), "tokens": raw["completion_tokens"].combine_chunks(),
            "truncated": raw["truncated"].combine_chunks()}))
        self.seen.extend(stamps)
        self._table = None
        if phases is None and self.writer:
            self.pending.append((raw, per_part[0]))
            if len(self.seen) % SEGMENT_PARTS == 0:
                self._write_segment()

    # ------------------------------------------------------------------ segments
    def _segment_files(self) -> list[Path]:
        return sorted(self.segments.glob("seg-*.parquet")) if self.segments.is_dir() else []

    def _load_segments(self, parts: list[Path]) -> None:
        for seg in self._segment_files():
            first = int(seg.stem.split("-")[1])
            try:
                meta = json.loads(pq.read_schema(seg).metadata[META])
                stamps = meta["stamps"]
                valid = first == len(self.seen) and len(parts) >= first + len(stamps) and all(
                    stamp(p) == s for p, s in zip(parts[first:], stamps))
                raw = pq.read_table(seg, read_dictionary=STRINGS) if valid else None
            except (OSError, KeyError, ValueError, pa.ArrowException):
                valid = False
            if not valid:
                self.drop_segments(first)
                return
            self._add(raw, stamps, phases=meta["phases"])

    def _write_segment(self) -> None:
        raw, first = pa.concat_tables([t for t, _ in self.pending]), len(self.seen) - len(self.pending)
        phases = [pairs for _, pairs in self.pending]
        self.pending = []
        table = pa.table({"phase": raw["phase"], "phase_index": raw["phase_index"], "phase_kind": raw["phase_kind"],
                          "problem_id": raw["problem_id"], "correct": pc.equal(raw["reason"].cast(pa.string()),
                                                                               "correct"),
                          "global_step": raw["global_step"], "completion_tokens": raw["completion_tokens"],
                          "truncated": raw["truncated"]})
        meta = {"stamps": self.seen[first:], "phases": phases}
        table = table.replace_schema_metadata({META: json.dumps(meta).encode()})
        path = self.segments / f"seg-{first:06d}-{len(self.seen) - 1:06d}.parquet"
        try:
            with atomic_file(path, "wb", encoding=None) as handle:
                pq.write_table(table, handle)
        except OSError as exc:
            warnings.warn(f"ledger index segment {path} not written ({exc}); the ledger's parts are intact, a cold "
                          f"process reads them one by one")

    def drop_segments(self, first_part: int) -> None:
        """Delete the segments that cover part ``first_part`` or later (the writer, after its parts changed)."""
        if not self.writer:
            return
        for seg in self._segment_files():
            if int(seg.stem.split("-")[2]) >= first_part:
                seg.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = (pa.concat_tables(self.chunks) if self.chunks else pa.table({
                "phase": pa.array([], pa.int32()), "phase_index": pa.array([], pa.int32()),
                "problem": pa.array([], pa.int32()), "correct": pa.array([], pa.bool_()),
                "global_step": pa.array([], pa.int64()), "tokens": pa.array([], pa.int32()),
                "truncated": pa.array([], pa.bool_())}))
        return self._table

    def parts_with(self, phase: str) -> list[Path]:
        return [self.dir / seen[0] for seen, phases in zip(self.seen, self.part_phases) if phase in phases]
