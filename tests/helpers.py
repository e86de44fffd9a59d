"""What several test modules share (test modules never import each other): the entry point in a subprocess,
bit-equality of saved weights, and hand-made ledgers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file

from stagewise_pl.ledger import DifficultyLedger
from stagewise_pl.records import RolloutRecord


def fit(args, env_extra=None, timeout=1800, cwd=None):  # a net for hangs, not a speed check
    """``python -m stagewise_pl.fit ARGS`` in a fresh process (not inside a DDP launch's environment)."""
    env = dict(os.environ, **(env_extra or {}))
    env.pop("STAGEWISE_RUN_DIR", None)
    return subprocess.run([sys.executable, "-m", "stagewise_pl.fit", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "run.threads=1",
       "run.deterministic=false"]


def fit_ddp(args, run_dir: Path):
    """``fit`` in two gloo DDP processes on the CPU: asserts that it finished and that both ranks trained on the same
    routing to the same final weights; returns the output and rank 0's digests (phase -> selection, final weights)."""
    out = fit(list(args) + [f"run.dir={run_dir}", *DDP], timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((run_dir / "routing" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and "final weights" in ranks[0]
    return out, ranks[0]


def same_weights(a: Path, b: Path) -> bool:
    """Two saved policies hold bit-identical tensors."""
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def hand_ledger(directory: Path, results: dict) -> DifficultyLedger:
    """A ledger written by hand. results: phase name -> (kind, number, {problem: [rewards]})."""
    ledger = DifficultyLedger(directory, run_id="hand")
    for name, (kind, number, by_problem) in results.items():
        ledger.record([RolloutRecord(name, kind, 0, pid, j, r, "correct" if r > 0 else "wrong", 5, False,
                                     not any(rs), None if r > 0 else "x", 0, number, 0)
                       for pid, rs in by_problem.items() for j, r in enumerate(rs)])
    return ledger


class CrashAt(L.Callback):
    """Raises after optimizer step ``step`` (a crash mid-phase; checkpoints before it survive)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("injected crash")
