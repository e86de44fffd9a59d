"""Progress of long inner work (generation chunks, grading), readable wherever the output goes.

On a terminal :func:`progress` is a live tqdm bar that is cleared when it ends. Off a terminal (a Slurm log,
``> run.log``, CI) a bar's carriage returns would fill the log and run into the next message, so it writes whole
lines instead: ``desc: 50% (512/1024), 31 s`` at each quarter of the work, and only once the work has run for
``min_seconds`` (short calls, a GRPO step's rollouts, print nothing: the phase's own lines say where the run is).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional


class LineProgress:
    """tqdm's ``update``/``close`` as whole lines at quarters of ``total`` (see the module's docstring)."""

    def __init__(self, total: int, desc: str, min_seconds: float = 10.0, parts: int = 4, write=None):
        self.total, self.desc, self.min_seconds, self.parts = max(0, int(total)), desc, min_seconds, parts
        self.write = write or (lambda text: print(text, file=sys.stdout, flush=True))
        self.done, self.started, self.part, self.printed = 0, time.monotonic(), 0, False
        self._lock = threading.Lock()  # the grading pool's threads update one counter

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if not self.total:
                return
            part = min(self.parts, self.done * self.parts // self.total)
            if part > self.part:
                self.part = part
                elapsed = time.monotonic() - self.started
                if elapsed >= self.min_seconds and part < self.parts:
                    self._line(elapsed)

    def _line(self, elapsed: float) -> None:
        self.printed = True
        self.write(f"{self.desc}: {100 * self.done // max(1, self.total)}% ({self.done}/{self.total}), {elapsed:.0f} s")

    def close(self) -> None:
        if self.printed and self.done >= self.total:  # the lines began: end them
            self._line(time.monotonic() - self.started)
            self.printed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True, stream: Optional[object] = None):
    """A progress counter over ``total`` items (``update(n)``, ``close()``, a context manager): a live bar on a
    terminal, whole lines off one (:class:`LineProgress`), nothing when not ``enabled``."""
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=stream)
    return LineProgress(total, desc)
