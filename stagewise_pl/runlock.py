"""One launch per run directory: ``run.dir/run.lock``.

Two launches on one run directory (a Slurm requeue racing a manual ``resume=last``, a command started twice) would
write the same checkpoints and ledger parts. A launch takes the lock before it reads the run's state and holds it
to its end: an exclusive ``flock`` on ``run.lock`` (released by the kernel when the process ends, however it ends)
and, in the file, who holds it (pid, host, start time, command line) for the message a second launch gets. The
second launch is refused at once, before it writes anything (:class:`RunLocked`, exit code 5).

A lock file whose process is gone (it was killed: no ``flock`` is held any more) is stale: the next launch takes it
over and says so in its log, naming the process that left it. On a shared filesystem the ``flock`` is the
filesystem's (NFS: its lock manager); where that does not reach across hosts, the file's host and pid are still
there to read. Under DDP only rank 0 takes the lock (the other ranks are its own processes).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

LOCK_NAME = "run.lock"


class RunLocked(RuntimeError):
    """Another launch holds the run directory; the message names it (pid, host, start) and what to do."""


def holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def read_holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """The run directory's lock (see the module's docstring): ``acquire()`` or :class:`RunLocked`; ``release()``."""

    def __init__(self, directory: Path, log: Callable[[str], None] = print):
        self.directory, self.log = Path(directory), log
        self.path = self.directory / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                break
            try:  # a holder that ended between our open and our flock removed the file we locked: open it anew
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return self._hold(fd)
            os.close(fd)
        info = read_holder(self.path)
        raise RunLocked(
            f"run.dir={self.directory} is in use by another launch: {holder_text(info)} "
            f"({' '.join(info.get('argv', [])) or 'command line unknown'}). Two launches would write the same "
            f"checkpoints and ledger: wait for it to end, or stop it (kill -TERM {info.get('pid', 'PID')} on "
            f"{info.get('host', 'its host')}: it checkpoints first) and resume=last. A lock left by a process "
            f"that was killed is taken over by the next launch.")

    def _hold(self, fd: int) -> "RunLock":
        previous = read_holder(self.path)
        if previous.get("pid"):
            self.log(f"run.lock: taking over a stale lock, left by {holder_text(previous)}, which no longer runs")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Ends the hold: the file is removed (a clean end leaves no lock to take over), then the flock goes."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
