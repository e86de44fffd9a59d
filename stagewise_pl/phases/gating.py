"""What the phase manager does for the development split (:mod:`stagewise_pl.phases.dev`) and the phase gates
(:mod:`stagewise_pl.routing.gate`): grade the split before the first phase and after every training phase, keep the
policy's weights at each training phase's start while a gate is configured, ask the gates, and roll a phase back.

Every step is redone alike after a kill: a grading is read back from ``<run>/dev/<label>.json``, the weights a
rollback returns to are in ``<run>/gate/NN-<phase>.pt`` (written before the phase's first checkpoint, removed once
the next phase's first checkpoint is written), and the decision is recomputed from the two gradings.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from stagewise_pl import dist
from stagewise_pl.faults import fault_point
from stagewise_pl.io import atomic_file
from stagewise_pl.plan import PhaseSpec, earlier
from stagewise_pl.routing.gate import RETRY, gates_of, judge


class PhaseGating:
    def __init__(self, ctx, rules):
        self.ctx, self.gates = ctx, gates_of(rules)

    @property
    def dev(self):
        return self.ctx.dev

    def snapshot_file(self, spec: PhaseSpec):
        return self.ctx.rundir.phase_file("gate", spec.number, spec.name, ".pt")

    # --------------------------------------------------------------- a phase's start
    def grade_before(self) -> None:
        if self.dev is not None and dist.is_main():
            self.dev.grade("before")
        dist.barrier()

    def snapshot(self, spec: PhaseSpec) -> None:
        """The policy's weights at the start of a training phase, while a gate may roll it back."""
        if not self.gates or self.dev is None or not self.ctx.traits[spec.kind].trains:
            return
        if dist.is_main():
            path = self.snapshot_file(spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as handle:
                torch.save(self.ctx.policy.state_dict(), handle)
        dist.barrier()

    def prune(self, current: Optional[PhaseSpec]) -> None:
        """Remove the start weights of every phase but ``current`` (its own first checkpoint is written); None: of
        every phase, at the run's end once its last checkpoint is written."""
        folder = self.ctx.rundir / "gate"
        if dist.is_main() and folder.is_dir():
            keep = None if current is None else self.snapshot_file(current).name
            for path in folder.glob("*.pt"):
                if path.name != keep:
                    path.unlink(missing_ok=True)
        if current is None:
            fault_point("gate_cleared")

    # --------------------------------------------------------------- a phase's end
    def against(self, spec: PhaseSpec, decisions: dict) -> str:
        """The label the phase is judged against: the last earlier phase a gate kept, else ``before``."""
        label = "before"
        for done in earlier(self.ctx.plan, spec):
            gate = decisions.get(done.name, {}).get("gate")
            if gate and gate["action"] == "keep":
                label = done.name
        return label

    def close(self, spec: PhaseSpec, decisions: dict, summary: dict, last: bool = False) -> Optional[dict]:
        """Grade the split after a training phase, ask the gates, roll back if one says so. Updates ``summary``
        (development accuracy, its tokens, counted in ``generated_tokens``; the gate's action) and returns the gate's
        decision (None without gates). A ``retry`` of a retried phase or of the plan's ``last`` phase is a rollback."""
        if self.dev is None:
            return None
        decision = None
        if dist.is_main():
            completed = self.ctx.completed()  # the grading before the first phase is charged to the first one graded
            charged = any("dev_tokens" in completed.get(s.name, {}) for s in earlier(self.ctx.plan, spec))
            after = self.dev.grade(spec.name)
            fault_point("gate_grade")
            tokens = after["tokens"] + (0 if charged else self.dev.grade("before")["tokens"])
            summary["dev_accuracy"] = round(after["accuracy"], 4)
            summary["dev_tokens"] = tokens
            summary["generated_tokens"] = int(summary.get("generated_tokens", 0)) + tokens
            if self.gates:
                label = self.against(spec, decisions)
                decision = judge(self.gates, spec, self.dev.grade(label), after, label).to_dict()
                if decision["action"] == "retry" and (last or "retry_of" in decisions.get(spec.name, {})):
                    why = "the plan's last phase" if last else "a retry"
                    decision.update(action="rollback", reason=decision["reason"] + f"; {why} is not retried")
        decision = dist.broadcast(decision)
        if decision is None:
            return None
        summary["gate"] = decision["action"]
        if decision["action"] in ("rollback", "retry"):
            self.rollback(spec)
        return decision

    def rollback(self, spec: PhaseSpec) -> None:
        path = self.snapshot_file(spec)
        if not path.is_file():
            if spec.name in self.ctx.ledger.rolled_back():
                return  # the run's end removed the file after a checkpoint of the restored weights: loaded from it
            raise RuntimeError(f"phase {spec.name}: a gate rolls it back, but its start weights {path} are missing")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.ctx.policy.load_state_dict(state)
        fault_point("gate_restore")
        if dist.is_main():
            self.ctx.ledger.mark_rolled_back(spec.name)
        dist.barrier()


def retry_spec(spec: PhaseSpec, base_lr: float) -> PhaseSpec:
    """The phase run once more after a gate's ``retry``: same kind, problems and steps, half the learning rate; it
    gives no steps to a later phase (the first run's carry stands)."""
    return replace(spec, name=spec.name + RETRY, lr=(spec.lr if spec.lr is not None else base_lr) * 0.5, carry_to="")
