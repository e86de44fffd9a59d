"""The run's checkpoints: written whole or not at all, verified before a resume reads them.

``<run>/checkpoints/`` holds ``last.ckpt`` and the one before it, ``previous.ckpt``. A save writes a
temporary file, records its sha256 in ``digests.json`` (atomically), then renames: ``last.ckpt`` ->
``previous.ckpt``, the temporary file -> ``last.ckpt``. Whatever the moment of a kill, every file named
``*.ckpt`` is complete and its digest is on record, so a resume can tell a complete checkpoint from a
truncated, emptied or altered one. ``resume=last`` reads ``last.ckpt`` (``previous.ckpt`` when a kill
fell between the two renames); a corrupt ``last.ckpt`` stops the run with an error naming it, or with
``run.checkpoint_fallback=true`` the run resumes from ``previous.ckpt`` with a warning. A run is never
silently started afresh.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from stagewise_pl.io import atomic_write, file_digest, fsync_dir
from stagewise_pl.io import remove_partial as _remove_partial

LAST, PREVIOUS, DIGESTS = "last.ckpt", "previous.ckpt", "digests.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


def _record(directory: Path) -> Optional[dict]:
    path = directory / DIGESTS
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (ValueError, OSError):
        return {}


def known_digests(directory: Path) -> Optional[set[str]]:
    """The digests on record; None when the directory has no record (a run of an older version)."""
    record = _record(directory)
    return None if record is None else {v for v in record.values() if isinstance(v, str)}


def install(directory: Path, tmp: Path, kill_point: Callable[[str], None] = lambda _: None) -> None:
    """Give the complete file ``tmp`` the name ``last.ckpt`` (the former one becomes ``previous.ckpt``)."""
    new = file_digest(tmp)
    last, previous = directory / LAST, directory / PREVIOUS
    old = _record(directory) or {}
    # on record before any file changes its name: at every moment each *.ckpt file's digest is known
    atomic_write(directory / DIGESTS, json.dumps({LAST: old.get(LAST), PREVIOUS: old.get(PREVIOUS), "incoming": new}))
    if last.is_file():
        os.replace(last, previous)
    kill_point("checkpoint_rename")
    os.replace(tmp, last)
    atomic_write(directory / DIGESTS, json.dumps({LAST: new, PREVIOUS: old.get(LAST)}))
    fsync_dir(directory)


def remove_partial(directory: Path) -> None:
    """Temporary files of saves cut by a kill: never read, removed."""
    _remove_partial(directory)


def problem(path: Path, record: Optional[set[str]]) -> Optional[str]:
    """Why ``path`` cannot be trusted, or None."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    if record is None:
        return None  # nothing on record to check against (an older run): Lightning's load will tell
    if file_digest(path) not in record:
        return f"its content ({size} bytes) does not match any checkpoint this run wrote (truncated or altered)"
    return None


def choose(directory: Path, fallback: bool, warn: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint ``resume=last`` continues from; None when the directory has none."""
    last, previous = directory / LAST, directory / PREVIOUS
    record = known_digests(directory)
    candidates = [p for p in (last, previous) if p.is_file()]
    if not candidates:
        return None
    first = candidates[0]
    why = problem(first, record)
    if why is None:
        if first == previous:
            warn(f"resume: {last} is missing (a kill between two renames); resuming from {previous}")
        return first
    if first == last and fallback and previous.is_file() and problem(previous, record) is None:
        warn(f"resume: WARNING: {last} is corrupt ({why}); run.checkpoint_fallback=true: resuming from the "
             f"checkpoint before it, {previous} (the steps after it are done again)")
        return previous
    hint = (f"; set run.checkpoint_fallback=true to resume from {previous}" if first == last and previous.is_file()
            and not fallback else "")
    raise CheckpointError(f"checkpoint {first} is corrupt: {why}{hint}")
