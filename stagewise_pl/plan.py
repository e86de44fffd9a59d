"""The plan as data: an ordered list of phases, checked before any work, as a pure function.

A phase has a kind (profile, sft, bridge_sft, cft, grpo, eval, or a registered one), a data selector (``all`` or a bucket that a stage rule builds), a budget (steps,
or epochs for SFT) and overrides (learning rate, batch size, sampling temperature, a problem limit).

:func:`build_plan` needs no Trainer, model or data: it takes the phase configs, the phase kinds
that exist and what each stage rule declares (the buckets it builds and the phase kind whose
ledger records it reads), and returns the phases or raises :class:`ConfigError` naming the phase.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from stagewise_pl.config import ConfigError

# kinds that train on targets: they take an epoch budget and replay
SUPERVISED = ("sft", "bridge_sft", "cft")


@dataclass(frozen=True)
class PhaseSpec:
    index: int  # 1-based place in the plan
    name: str
    kind: str
    select: str = "all"
    steps: int = 100
    epochs: float = 0.0
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    temperature: Optional[float] = None
    limit: int = 0
    replay: float = 0.0
    fallback: str = ""

    def budget(self, n_items: int, batch_size: int) -> int:
        """Steps this phase runs: ``steps``, or ``epochs`` passes over ``n_items`` in batches of ``batch_size``."""
        if self.epochs > 0:
            return max(1, round(self.epochs * n_items / batch_size))
        return self.steps


@dataclass(frozen=True)
class RuleInfo:
    """What a stage rule declares: its name, the buckets it builds, the kind of phase it reads."""

    name: str
    buckets: tuple[str, ...]
    reads: Optional[str] = None  # a phase kind that must come before a phase selecting one of its buckets


def rule_info(rule) -> RuleInfo:
    return RuleInfo(getattr(rule, "name", type(rule).__name__), tuple(getattr(rule, "buckets", ())),
                    getattr(rule, "reads", None))


def build_plan(phases: Sequence, kinds: Iterable[str], rules: Sequence[RuleInfo] = ()) -> list[PhaseSpec]:
    """The checked plan. ``phases``: PhaseConfig-like objects; ``kinds``: phase kinds that exist."""
    kinds = set(kinds)
    if not phases:
        raise ConfigError("phases: the plan needs at least one phase")
    producers = {bucket: rule for rule in rules for bucket in rule.buckets}
    specs: list[PhaseSpec] = []
    for i, p in enumerate(phases):
        key = f"phases.{i}"
        if p.kind not in kinds and "." not in p.kind and ":" not in p.kind:
            raise ConfigError(f"{key}.kind: unknown phase kind {p.kind!r}; registered: {', '.join(sorted(kinds))} "
                              f"(or give a dotted path package.module:name)")
        select = p.select or "all"
        fallback = getattr(p, "fallback", "") or ""
        for field, bucket in (("select", select), ("fallback", fallback)):
            if not bucket or ":" in bucket or bucket == "all":  # a rule by dotted path: the buckets it builds
                continue
            rule = producers.get(bucket)
            if rule is None:
                known = sorted(producers) or ["none: stages.rules is empty"]
                raise ConfigError(f"{key}.{field}={bucket!r}: no stage rule builds this bucket; buckets: "
                                  f"{', '.join(known)} (or 'all')")
            if rule.reads and not any(s.kind == rule.reads for s in specs):
                raise ConfigError(f"{key}.{field}={bucket!r}: rule {rule.name} builds it from the ledger records "
                                  f"of a {rule.reads} phase, and no {rule.reads} phase comes before phase {i}")
        if fallback and select == "all":
            raise ConfigError(f"{key}.fallback: a phase on 'all' never has an empty selection")
        if p.kind in SUPERVISED and p.steps <= 0 and p.epochs <= 0:
            raise ConfigError(f"{key}: {p.kind} phases need steps > 0 or epochs > 0")
        if p.epochs > 0 and p.kind not in SUPERVISED:
            raise ConfigError(f"{key}.epochs: only {', '.join(SUPERVISED)} phases take an epoch budget (kind is {p.kind})")
        if p.replay > 0 and p.kind not in SUPERVISED:
            raise ConfigError(f"{key}.replay: only {', '.join(SUPERVISED)} phases replay other problems "
                              f"(kind is {p.kind})")
        if p.kind == "cft" and not any(s.kind in ("profile", "grpo") for s in specs):
            raise ConfigError(f"{key}: a cft phase critiques failed rollouts from the ledger, and no profile or "
                              f"grpo phase comes before phase {i}")
        specs.append(PhaseSpec(i + 1, p.name or f"{i + 1}-{p.kind}", p.kind, select, p.steps, float(p.epochs), p.lr,
                               p.batch_size, p.temperature, p.limit, float(p.replay), fallback))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"phases: names must be unique, got {names}")
    return specs


def fingerprint(specs: Sequence[PhaseSpec], rules: Sequence[dict], data_digest: str) -> str:
    """A digest of the plan, the rules and the training data: a resumed run must match it (unless forced)."""
    text = json.dumps({"plan": [asdict(s) for s in specs], "rules": list(rules), "data": data_digest},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(specs: Sequence[PhaseSpec]) -> list[str]:
    """One line per phase, for --dry-run and the log."""
    out = []
    for s in specs:
        budget = {"profile": "", "eval": ""}.get(s.kind, f", {s.epochs:g} epochs" if s.epochs > 0 else
                                                 f", {s.steps} steps")
        extra = "".join(f", {k} {v}" for k, v in (("lr", s.lr), ("batch", s.batch_size), ("temperature", s.temperature),
                                                   ("limit", s.limit or None), ("replay", s.replay or None),
                                                   ("fallback", s.fallback or None))
                        if v is not None)
        out.append(f"{s.name}: {s.kind} on {s.select}{budget}{extra}")
    return out
