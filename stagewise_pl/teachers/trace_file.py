"""Teacher traces from a JSONL file made offline (by a large model, or by hand).

One row per problem: ``{"id": ..., "traces": ["...", ...]}`` (or ``"trace": "..."``). Rows are read by the pools'
JSONL reader (:func:`stagewise_pl.data.loaders.jsonl_rows`: the same bad-row rules) and checked when the file is
read: a bad row stops with ``file:line`` and its reason; a problem with no row stops with its id.
The file holds traces only: ``critique`` needs another teacher.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from stagewise_pl.data.problems import BadRowError, Problem
from stagewise_pl.teachers.base import TEACHERS, TeacherError


@TEACHERS.register("trace_file")
class TraceFileTeacher:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherError(f"trace file {self.path} does not exist")
        self.by_id: dict[str, list[str]] = {}
        from stagewise_pl.data.loaders import jsonl_rows

        for number, row in jsonl_rows(self.path):
            if isinstance(row, BadRowError):
                raise row
            where = f"{self.path}:{number}"
            if not isinstance(row.get("id"), (str, int)):
                raise BadRowError(where, "needs an 'id'")
            traces = row.get("traces", [row["trace"]] if "trace" in row else None)
            if not isinstance(traces, list) or not traces or not all(isinstance(t, str) and t.strip()
                                                                       for t in traces):
                raise BadRowError(where, "needs 'traces' (a list of non-empty strings) or 'trace'")
            if str(row["id"]) in self.by_id:
                raise BadRowError(where, f"problem id {row['id']!r} appears twice")
            self.by_id[str(row["id"])] = traces

    def traces(self, problems: Sequence[Problem], n: int = 1) -> list[list[str]]:
        missing = [p.id for p in problems if p.id not in self.by_id]
        if missing:
            raise TeacherError(f"trace file {self.path} has no trace for {len(missing)} problems, e.g. {missing[:3]}")
        return [self.by_id[p.id][:n] for p in problems]

    def critique(self, problem: Problem, failed_completion: str) -> str:
        raise TeacherError(f"trace file {self.path} holds traces, not critiques: name another teacher for critiques")
