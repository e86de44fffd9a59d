"""The built-in phase gate (see :mod:`stagewise_pl.routing.gate`).

:class:`DevAccuracyGate` rolls a training phase back when the development split's accuracy fell by more than a
margin from the last kept state. The margin by default is ``z`` standard errors of the development accuracy before
the phase (the split's own sampling noise: the spread of its per-problem scores over the square root of its size,
at least one problem in ``n``), so a small split tolerates larger drops than a large one. ``action: retry`` runs
such a phase once more from its start at half its learning rate instead of only rolling it back.

    routing:
      rules:
        - {target: stagewise_pl.callbacks.rules:RouteByPassRate}
        - {target: stagewise_pl.callbacks.rules:NeverSolvedInRL}
        - {target: stagewise_pl.callbacks.gate:DevAccuracyGate, args: {z: 1.0}}
"""
from __future__ import annotations

from typing import Optional

from stagewise_pl.routing.gate import GateDecision, PhaseGate


class DevAccuracyGate(PhaseGate):
    name = "dev_accuracy_gate"

    def __init__(self, margin: Optional[float] = None, z: float = 1.0, kinds: Optional[list] = None,
                 action: str = "rollback"):
        if action not in ("rollback", "retry"):
            raise ValueError(f"action must be rollback or retry (once, at half the learning rate), got {action!r}")
        self.action = action
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 (or null: z standard errors), got {margin}")
        if z < 0:
            raise ValueError(f"z must be >= 0, got {z}")
        self.margin, self.z = margin, z
        self.kinds = None if kinds is None else set(kinds)  # judge only phases of these kinds; None = every one

    def judge(self, phase, before: dict, after: dict, against: str) -> GateDecision:
        margin = self.margin if self.margin is not None else self.z * before["stderr"]
        drop = before["accuracy"] - after["accuracy"]
        if self.kinds is not None and phase.kind not in self.kinds:
            action, reason = "keep", f"kind {phase.kind} is not judged"
        elif drop > margin + 1e-12:
            action, reason = self.action, f"development accuracy fell {drop:.3f} > margin {margin:.3f}"
        else:
            action, reason = "keep", f"development accuracy changed {-drop:+.3f} (margin {margin:.3f})"
        return GateDecision(action, before["accuracy"], after["accuracy"], round(margin, 6), against, self.name,
                            reason)
