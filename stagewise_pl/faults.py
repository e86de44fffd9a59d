"""Fault injection for tests: kill the process (or poison a value) at a named point, not at a time.

``STAGEWISE_FAULT=<point>`` makes the process SIGKILL itself when it reaches ``<point>``; several
points may be given, separated by commas. ``<point>#<k>`` fires on the k-th time the point is reached
in this process (points without a phase or step in their name, such as ``decode``, need it).
Points the stage manager and the parts it drives pass:

- ``step:<phase>:<n>`` — after step n of a phase (for GRPO: rollout step n, its rollouts already in
  the ledger), before any checkpoint of that step;
- ``checkpoint:<phase>:<n>`` — right after the checkpoint written after step n;
- ``checkpoint_write`` — a checkpoint written to its temporary file, not yet renamed into place;
- ``phase_end:<phase>`` — after a phase is closed (exported, evaluated, in state.json), before the
  next one starts;
- ``sft_backward`` — inside an SFT step, after the backward pass and before the optimizer step;
- ``decode`` — inside a rollout, after a decoding step of the HF engine;
- ``verify`` — inside a verifier call, with the pairs sent to a grading worker and no answer read;
- ``ledger_rename`` — a ledger part written to its temporary file, not yet renamed into place;
- ``engine_generate`` — inside a rollout, as the vLLM engine (which lives in the training process) is called;
- ``gate_grade`` — a training phase's development split graded (its file written), before the gates judge it;
- ``gate_restore`` — a phase gate's rollback: the start weights loaded into the policy, the ledger not yet marked;
- ``gate_cleared`` — at the run's end, the last checkpoint written and the start weights removed, the run not yet
  marked finished.

``engine_dead`` is not a kill: vLLM's engine core is shut down just before a generation call, which then fails
as it does when the engine core dies (:mod:`stagewise_pl.rollout.vllm_engine`).

``enospc:<folder>`` is not a kill: the write of a file into a folder of that name (a directory written whole: its
own name) fails as a full disk would (:mod:`stagewise_pl.io`).

``nan_loss:<phase>:<n>`` is not a kill: the loss of step n of that phase is made NaN (see
:func:`poisoned`), to test the non-finite guard; in a GRPO phase, of the n-th rollout step that trains (a rollout
step whose groups all carry no signal makes no update, so it has no loss to poison).

``STAGEWISE_FAULT_RANK`` limits the kill to one rank (default: every rank that reaches the point).
``STAGEWISE_FAULT_SIGNAL`` sends another signal instead (``USR1``, ``TERM``, ``INT``): the process then
goes on, and what it does with the signal is under test (see :mod:`stagewise_pl.preempt`).
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter = Counter()


def _wanted(point: str) -> bool:
    wanted = os.environ.get("STAGEWISE_FAULT")
    if not wanted:
        return False
    _reached[point] += 1
    names = wanted.split(",")
    if point not in names and f"{point}#{_reached[point]}" not in names:
        return False
    only = os.environ.get("STAGEWISE_FAULT_RANK")
    if only is not None:
        from stagewise_pl import dist

        if str(dist.rank()) != only:
            return False
    return True


def fault_point(point: str) -> None:
    if not _wanted(point):
        return
    name = os.environ.get("STAGEWISE_FAULT_SIGNAL", "KILL").upper().removeprefix("SIG")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def poisoned(point: str) -> bool:
    """True where ``STAGEWISE_FAULT`` names ``point``: the caller makes its value non-finite."""
    return _wanted(point)
