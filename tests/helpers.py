"""What several test modules share (test modules never import each other): the entry point in a subprocess,
bit-equality of saved weights, what a run leaves that a kill must not change (``outcome``), a resume as the
sbatch script does it, and hand-made ledgers."""
from __future__ import annotations

import hashlib
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


def outcome(run_dir: Path) -> dict:
    """What a run leaves that must not depend on how often it was killed: final weights, ledger, per-step curves
    (losses, rewards), phase summaries without wall times, routing decisions."""
    weights = hashlib.sha256()
    for name, tensor in sorted(load_file(str(run_dir / "final" / "model.safetensors")).items()):
        weights.update(name.encode() + tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    ledger = DifficultyLedger(run_dir / "ledger", "x", writer=False).table().drop(["run_id"]).to_pylist()
    state = json.loads((run_dir / "state.json").read_text())
    return {
        "weights": weights.hexdigest(),
        "ledger": hashlib.sha256(json.dumps(ledger, sort_keys=True).encode()).hexdigest(),
        "ledger_rows": len(ledger),
        "curves": {f.name: f.read_text() for f in sorted((run_dir / "curves").glob("*.json"))},
        "summaries": {name: {k: v for k, v in s.items() if not k.startswith("seconds")}
                      for name, s in state["completed"].items()},
        "routing": {f.name: f.read_text() for f in sorted((run_dir / "routing").glob("*.json"))},
        "finished": state.get("finished"),
    }


def partial_files(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if ".tmp-" in p.name]


def resume(args, run_dir: Path, *extra, env=None):
    """As the sbatch script does: resume=last where a checkpoint exists, resume=restart where none does."""
    has = any((run_dir / "checkpoints" / n).is_file() for n in ("last.ckpt", "previous.ckpt"))
    return fit(args + [f"run.dir={run_dir}", "resume=last" if has else "resume=restart", *extra], env)
