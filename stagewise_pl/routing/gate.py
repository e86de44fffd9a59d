"""Phase gates: rules that judge a training phase once it has run, by the development split, and keep it or roll it
back.

A gate is a routing rule (a Lightning Callback listed in ``routing.rules`` by dotted path) that routes nothing and
has a :meth:`PhaseGate.judge` method. After every training phase the phase manager grades the development split
(:mod:`stagewise_pl.phases.dev`) and asks each gate in order; the first that does not keep the phase decides:

- ``keep``: the phase stands;
- ``rollback``: the policy returns to the weights it had when the phase started (a file the manager writes at every
  training phase's start while a gate is configured; each phase builds its own optimizer and schedule, so the
  optimizer state returns with them: the next phase starts from a fresh one, as it would have). The phase's ledger
  rows stay and the ledger lists the phase as rolled back; its steps and tokens stay spent;
- ``retry``: rolled back as above, then run once more from its start weights at half its learning rate, as a phase
  ``<name>-retry`` on the same problems (its own steps and tokens, spent too), judged against the same grading; a
  retry is not retried (its ``retry`` is a rollback), and neither is the plan's last phase (nothing runs after it).

The decision goes into the phase's routing decision (``routing/NN-<phase>.json``, ``"gate"``), its summary
(``state.json``, ``summary.md``, the report) and the log. The development accuracy the next phase is judged against
is that of the last phase kept (``before`` at the start).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from stagewise_pl.plan import PhaseSpec
from stagewise_pl.routing.rules import RoutingRule, RoutingView

ACTIONS = ("keep", "rollback", "retry")
RETRY = "-retry"  # the suffix of a retried phase's name


@dataclass(frozen=True)
class GateDecision:
    action: str  # one of ACTIONS
    before: float  # development accuracy the phase is judged against (the last kept state's)
    after: float  # development accuracy after the phase
    margin: float  # how far it may fall before the gate acts
    against: str  # the label of ``before``: "before" or the last kept phase's name
    gate: str = ""  # the gate's name
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class PhaseGate(RoutingRule):
    """Base class of phase gates: ``judge(phase, before, after)`` with two development results (``phases.dev``:
    ``accuracy``, ``stderr``, ``n``, ``problems``) -> a :class:`GateDecision`."""

    buckets: tuple[str, ...] = ()

    def route(self, view: RoutingView, buckets: dict) -> dict:
        return buckets  # a gate routes nothing

    def judge(self, phase: PhaseSpec, before: dict, after: dict, against: str) -> GateDecision:
        raise NotImplementedError


def gates_of(rules) -> list:
    return [r for r in rules if callable(getattr(r, "judge", None))]


def judge(gates, phase: PhaseSpec, before: dict, after: dict, against: str) -> Optional[GateDecision]:
    """The first decision that is not ``keep``, else the last gate's ``keep`` (None without gates)."""
    decision = None
    for gate in gates:
        decision = gate.judge(phase, before, after, against)
        if decision.action not in ACTIONS:
            raise ValueError(f"phase gate {type(gate).__name__} answered {decision.action!r}; one of {ACTIONS}")
        if decision.action != "keep":
            return decision
    return decision
