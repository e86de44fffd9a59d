"""Stopping on a signal without losing a step: checkpoint, requeue under Slurm, exit non-zero.

SIGUSR1 (Slurm's warning before the time limit: ``--signal=USR1@120``), SIGTERM (preemption, scancel,
a kill) and a first Ctrl-C (SIGINT) only *record* the signal here. The stage manager looks at the
record at the end of the step in progress (every rank agrees: one rank's signal stops them all),
writes ``last.ckpt`` as at any step, and raises :class:`Preempted`. The run then, on rank 0 and only
when Slurm started it (``SLURM_JOB_ID`` set) and ``run.requeue`` is true, asks ``scontrol requeue`` for
its job (its array task when it is one), and the process exits with 128 + the signal's number. The
requeued task starts again with ``resume=last`` and continues at the step after the checkpoint.

A second Ctrl-C interrupts at once (Python's KeyboardInterrupt): the run then resumes from its last
periodic checkpoint, as after a kill.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from typing import Callable, Optional

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised after the checkpoint of the step in progress is written; carries the signal's number."""

    def __init__(self, signum: int, where: str, checkpoint: str):
        self.signum, self.where, self.checkpoint = signum, where, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after {where}; checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalWatch:
    """Records the first of :data:`SIGNALS` while installed (a context manager; main thread only).

    Nested watches share the outer one's record: the entry point installs one before anything slow
    (imports, model set-up), and the run's own is then the same."""

    _active: Optional["SignalWatch"] = None

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}
        self._outer: Optional[SignalWatch] = None

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name} received: the run stops after the step in progress, with a "
                  f"checkpoint" + (" (Ctrl-C again: stop now)" if signum == signal.SIGINT else ""), flush=True)

    def __enter__(self) -> "SignalWatch":
        if SignalWatch._active is not None:
            return SignalWatch._active
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
            SignalWatch._active = self
        return self

    def __exit__(self, *exc) -> None:
        if SignalWatch._active is not self:
            return  # an inner use of the outer watch
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        SignalWatch._active = None


def slurm_job() -> Optional[str]:
    """The Slurm job to requeue: ``ARRAYJOB_TASK`` for an array task, else ``SLURM_JOB_ID``; None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(log: Callable[[str], None]) -> bool:
    """Ask Slurm to requeue this job; True when scontrol accepted. Outside Slurm: nothing, False."""
    job = slurm_job()
    if job is None:
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log(f"requeue: scontrol is not on PATH; job {job} is NOT requeued (resume it with resume=last)")
        return False
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode:
        log(f"requeue: scontrol requeue {job} failed ({out.returncode}): {out.stderr.strip()[:300]}; "
            f"resume it with resume=last")
        return False
    log(f"requeue: job {job} requeued; it resumes from the checkpoint")
    return True
