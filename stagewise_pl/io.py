"""Write-then-rename, spelled once: a reader (or a resumed run) never sees half a file or half a directory.

- :func:`atomic_file` — a handle on a temporary file beside ``path``; on a clean exit the file is flushed,
  fsynced, renamed to ``path`` and the directory fsynced; on an error the temporary file is removed.
- :func:`atomic_write` — text or bytes through :func:`atomic_file`.
- :func:`atomic_dir` — a directory built under a temporary sibling name, then swapped into place.
- :func:`fsync_dir` — make a rename in ``directory`` durable.

Temporary names start with a dot and hold ``.tmp-<pid>`` so a later process can find and remove what a kill
left (:func:`remove_partial`). A write the disk refuses (full, over quota, read-only, too large) raises
:class:`WriteError` naming the file; the file (or directory) as it was before is untouched. This module imports
nothing of the project but :mod:`stagewise_pl.faults` (a leaf): every layer may use it.

``STAGEWISE_FAULT=enospc:<folder>[#k]`` (tests): the k-th write into a folder of that name (``ledger``, ``eval``,
``routing``; for a directory written whole, its own name: ``final``) fails as a full disk would.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, Union

from stagewise_pl.faults import poisoned

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class WriteError(OSError):
    """A write the disk refused (full, over quota, read-only): the message names the file; what was there before
    the write is intact."""

    def __init__(self, code: int, path: Path, reason: str):
        super().__init__(code, reason, str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}"


def _disk_fault(path: Path, folder: str) -> None:
    """The test fault ``enospc:<folder>[#k]`` (see the module's docstring; matched as every fault point is)."""
    if poisoned(f"enospc:{folder}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _refused(exc: BaseException, path: Path) -> BaseException:
    """``exc`` as a :class:`WriteError` naming ``path`` when the disk refused the write; otherwise as it is."""
    if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in DISK_ERRNOS:
        return WriteError(exc.errno, path, exc.strerror or os.strerror(exc.errno))
    return exc


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename in it survives a power cut)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through (unique per process and thread)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", before_rename: Callable[[], None] = lambda: None,
                encoding: str | None = "utf-8") -> Iterator:
    """``with atomic_file(p) as handle: ...``: ``p`` appears whole when the block ends, or not at all.
    ``before_rename`` runs after the data is durable and before the rename (a fault point, in tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            _disk_fault(path, path.parent.name)
            os.fsync(handle.fileno())
        before_rename()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        refused = _refused(exc, path)
        if refused is exc:
            raise
        raise refused from exc
    fsync_dir(path.parent)


def atomic_write(path: Path, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """``with atomic_dir(d) as tmp: <fill tmp>``: then ``d`` is replaced by ``tmp`` (an existing ``d`` is
    removed first). On an error the temporary directory is removed and ``d`` is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _disk_fault(directory, directory.name)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException as exc:
        refused = _refused(exc, directory)
        if refused is exc:
            raise
        raise refused from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(directory.parent)


def remove_partial(directory: Path) -> list[Path]:
    """Remove the temporary files and directories that writes cut by a kill left in ``directory``."""
    removed = []
    for stale in Path(directory).glob(".*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
