"""Fault injection for tests: kill the process at a named point, not at a time.

``STAGEWISE_FAULT=<point>`` makes the process SIGKILL itself when it reaches ``<point>``; several
points may be given, separated by commas. Points the stage manager passes:

- ``step:<phase>:<n>`` — after step n of a phase (for GRPO: rollout step n, its rollouts already in
  the ledger), before any checkpoint of that step;
- ``checkpoint:<phase>:<n>`` — right after the checkpoint written after step n;
- ``phase_end:<phase>`` — after a phase is closed (exported, evaluated, in state.json), before the
  next one starts.

``STAGEWISE_FAULT_RANK`` limits the kill to one rank (default: every rank that reaches the point).
``STAGEWISE_FAULT_SIGNAL`` sends another signal instead (``USR1``, ``TERM``, ``INT``): the process then
goes on, and what it does with the signal is under test (see :mod:`stagewise_pl.preempt`).
"""
from __future__ import annotations

import os
import signal


def fault_point(point: str) -> None:
    wanted = os.environ.get("STAGEWISE_FAULT")
    if not wanted or point not in wanted.split(","):
        return
    only = os.environ.get("STAGEWISE_FAULT_RANK")
    if only is not None:
        from stagewise_pl import dist

        if str(dist.rank()) != only:
            return
    name = os.environ.get("STAGEWISE_FAULT_SIGNAL", "KILL").upper().removeprefix("SIG")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
