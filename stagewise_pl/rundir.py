"""A run directory: where each thing a run writes lives, and its ``state.json``.

Layout::

    config.yaml            the resolved configuration
    state.json             format, training-data digest, the phases completed with their summaries, finished
    checkpoints/last.ckpt  the latest Lightning checkpoint; previous.ckpt the one before; digests.json (checkpoints.py)
                           (run.keep=final removes checkpoints/ once the run has finished)
    curves/NN-<phase>.json per-step series of a training phase (SFT losses; GRPO rewards, losses, ...)
    ledger/                every graded rollout (the difficulty ledger, Parquet parts)
    routing/NN-<phase>.json what the stage rules decided at each phase boundary; routing/ranks/ per-rank digests
    bridge/, cft/          the data bridge_sft and cft phases made
    export/<phase>/        the policy after each training phase (save_pretrained; not with run.keep=final)
    eval/<label>.json      evaluation results (before, and after each phase)
    logs/                  CSV / TensorBoard / W&B logs
    final/                 the last policy (save_pretrained)
    summary.md             the accuracy table

Every file is written through :mod:`stagewise_pl.io` (temporary file, fsync, rename). Only the process that
writes (rank 0) calls the writing methods.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stagewise_pl.io import atomic_write

# 2: written by the phase-context core (phases/, routing/); a run of format 1 (no "format" in state.json)
# cannot be resumed by this version (see Run.check_format)
FORMAT = 2


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    # ------------------------------------------------------------------ places
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger"

    def phase_file(self, folder: str, index: int, name: str, suffix: str = ".json") -> Path:
        """``<folder>/NN-<phase><suffix>``: routing, curves, bridge and cft files of the phase at ``index``."""
        return self.path / folder / f"{index:02d}-{name}{suffix}"

    def eval_file(self, label: str) -> Path:
        return self.path / "eval" / f"{label}.json"

    def export_dir(self, name: str) -> Path:
        return self.path / "export" / name

    # ------------------------------------------------------------------ state.json
    def state(self) -> dict:
        path = self.path / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"completed": {}}

    def write_state(self, state: dict) -> None:
        atomic_write(self.path / "state.json", json.dumps(dict(state, format=FORMAT), indent=1))

    def completed(self) -> dict[str, dict]:
        """Phase name -> summary of every phase completed so far, in order."""
        return self.state()["completed"]

    def mark_completed(self, name: str, summary: dict) -> None:
        state = self.state()
        state["completed"][name] = summary
        self.write_state(state)

    def update_state(self, **values: Any) -> None:
        self.write_state(dict(self.state(), **values))

    def write_json(self, path: Path, doc: Any, indent: int | None = 1) -> None:
        atomic_write(path, json.dumps(doc, indent=indent))
