"""The plan as data: an ordered list of phases, checked before any work, as a pure function.

A phase has a kind (profile, sft, bridge_sft, cft, grpo, eval, or a registered one), a data selector (``all``
or a bucket that a routing rule builds), a step count (``steps``, or ``epochs`` for supervised kinds) and
overrides (learning rate, batch size, sampling temperature, a problem limit, replay, a fallback bucket).

Each phase kind declares its :class:`PhaseTraits` (on its runner class, :mod:`stagewise_pl.phases`). The plan
check, the token-budget arithmetic, the experiment and the phase manager read the traits, never a list of
kind names, so a kind registered from outside the package is checked and run like a built-in one.

:func:`build_plan` needs no Trainer, model or data: it takes the phase configs, the traits of every kind that
exists and what each routing rule declares (the buckets it builds and the phase kind whose ledger records it
reads), and returns the phases or raises :class:`ConfigError` naming the phase.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Optional, Sequence

from stagewise_pl.config import ConfigError


@dataclass(frozen=True)
class PhaseTraits:
    """What the core needs to know about a phase kind, declared by its runner class."""

    trains: bool = False  # updates the policy: exported after it, takes a share of an experiment's optimizer steps
    supervised: bool = False  # trains on targets: may take an epoch count and replay other problems
    generates: bool = False  # samples from the student: its tokens count against budget.generated_tokens
    records_rollouts: bool = False  # writes graded rollouts to the ledger (rules and critique phases read them)
    reads_rollouts: bool = False  # needs an earlier phase that records rollouts (its failures are its input)
    uses_teacher: bool = False  # asks the teacher and the critic, with the prompt templates (checked before any work)
    token_budgeted: bool = False  # sizes its rollout steps to keep the run on budget.generated_tokens
    gradable_only: bool = True  # works only on problems whose gold answer the verifier can grade
    uses_pool: bool = True  # works on training-pool problems (False: held-out sets only, like eval)
    step_unit: str = "optimizer step"  # what its `steps` count ("" = it runs over its problems, steps unused)


@dataclass(frozen=True)
class PhaseSpec:
    number: int  # the phase's place in the plan, counted from 1 (its files are NN-<name>)
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
    passes: float = 0.0  # supervised kinds: passes over the items, at most ``steps``; the rest go to carry_to
    carry_to: str = ""  # the later phase that gets the steps ``passes`` leaves (resolved by build_plan)

    def step_count(self, n_items: int, batch_size: int) -> int:
        """Steps this phase runs: ``steps``; or ``epochs`` passes over ``n_items`` in batches of ``batch_size``; or
        ``passes`` over them, at most ``steps``."""
        if self.epochs > 0:
            return max(1, round(self.epochs * n_items / batch_size))
        if self.passes > 0:
            return min(self.steps, max(1, round(self.passes * n_items / batch_size))) if n_items else 0
        return self.steps


def carried_steps(plan: Sequence[PhaseSpec], spec: PhaseSpec, completed: Mapping[str, dict]) -> int:
    """The steps earlier phases with ``passes`` left unused and gave to ``spec`` (their summaries say)."""
    summaries = [completed.get(s.name, {}) for s in earlier(plan, spec)]
    return sum(int(s.get("carried_steps", 0)) for s in summaries if s.get("carried_to") == spec.name)


@dataclass(frozen=True)
class RuleInfo:
    """What a routing rule declares: its name, the buckets it builds, the kind of phase it reads."""

    name: str
    buckets: tuple[str, ...]
    reads: Optional[str] = None  # a phase kind that must come before a phase selecting one of its buckets


def rule_info(rule) -> RuleInfo:
    return RuleInfo(getattr(rule, "name", type(rule).__name__), tuple(getattr(rule, "buckets", ())),
                    getattr(rule, "reads", None))


def short_kind(kind: str) -> str:
    """A kind as it appears in default phase names: a dotted path's last part (``pkg.mod:Distill`` -> distill)."""
    return kind.replace(":", ".").rpartition(".")[2].lower() if (":" in kind or "." in kind) else kind


def position(plan: Sequence[PhaseSpec], spec: PhaseSpec) -> int:
    """Where ``spec`` stands in ``plan``: by name (a plan may hold a phase a gate added, see routing.gate), else by
    its number."""
    return next((i for i, s in enumerate(plan) if s.name == spec.name), spec.number - 1)


def earlier(plan: Sequence[PhaseSpec], spec: PhaseSpec, since: Optional[PhaseSpec] = None) -> list[PhaseSpec]:
    """The phases of ``plan`` that run before ``spec`` (after ``since`` when given), in order."""
    return list(plan[position(plan, since) + 1 if since is not None else 0:position(plan, spec)])


def later(plan: Sequence[PhaseSpec], spec: PhaseSpec) -> list[PhaseSpec]:
    """The phases of ``plan`` that run after ``spec``, in order."""
    return list(plan[position(plan, spec) + 1:])


def build_plan(phases: Sequence, traits: Mapping[str, PhaseTraits], rules: Sequence[RuleInfo] = ()) -> list[PhaseSpec]:
    """The checked plan. ``phases``: PhaseConfig-like objects; ``traits``: kind -> its traits, for every kind
    that exists (registered names, and the dotted paths the plan names that imported)."""
    if not phases:
        raise ConfigError("phases: the plan needs at least one phase")
    producers = {bucket: rule for rule in rules for bucket in rule.buckets}
    specs: list[PhaseSpec] = []
    for i, p in enumerate(phases):
        key = f"phases.{i}"
        t = traits.get(p.kind)
        if t is None:
            registered = sorted(k for k in traits if ":" not in k and "." not in k)
            raise ConfigError(f"{key}.kind: unknown phase kind {p.kind!r}; registered: {', '.join(registered)} "
                              f"(or give a dotted path package.module:Class)")
        select = p.select or "all"
        fallback = getattr(p, "fallback", "") or ""
        for field, bucket in (("select", select), ("fallback", fallback)):
            if not bucket or ":" in bucket or bucket == "all":  # a rule by dotted path: the buckets it builds
                continue
            rule = producers.get(bucket)
            if rule is None:
                known = sorted(producers) or ["none: routing.rules is empty"]
                raise ConfigError(f"{key}.{field}={bucket!r}: no routing rule builds this bucket; buckets: "
                                  f"{', '.join(known)} (or 'all')")
            if rule.reads and not any(s.kind == rule.reads for s in specs):
                raise ConfigError(f"{key}.{field}={bucket!r}: rule {rule.name} builds it from the ledger records "
                                  f"of a {rule.reads} phase, and no {rule.reads} phase comes before phase {i}")
        if fallback and select == "all":
            raise ConfigError(f"{key}.fallback: a phase on 'all' never has an empty selection")
        supervised = sorted(k for k, kt in traits.items() if kt.supervised and ":" not in k and "." not in k)
        if t.supervised and p.steps <= 0 and p.epochs <= 0:
            raise ConfigError(f"{key}: {p.kind} phases need steps > 0 or epochs > 0")
        if p.epochs > 0 and not t.supervised:
            raise ConfigError(f"{key}.epochs: only supervised phases ({', '.join(supervised)}) take an epoch count "
                              f"(kind is {p.kind})")
        passes = float(getattr(p, "passes", 0.0) or 0.0)
        if passes > 0 and (not t.supervised or p.epochs > 0):
            raise ConfigError(f"{key}.passes: only supervised phases take passes, and not with epochs (kind "
                              f"{p.kind}, epochs {p.epochs:g})")
        if getattr(p, "carry_to", "") and passes <= 0:
            raise ConfigError(f"{key}.carry_to: only a phase with passes leaves steps to carry")
        if p.replay > 0 and not t.supervised:
            raise ConfigError(f"{key}.replay: only supervised phases ({', '.join(supervised)}) replay other "
                              f"problems (kind is {p.kind})")
        if t.reads_rollouts and not any(traits[s.kind].records_rollouts for s in specs):
            recorders = sorted(k for k, kt in traits.items() if kt.records_rollouts and ":" not in k)
            raise ConfigError(f"{key}: a {p.kind} phase reads failed rollouts from the ledger, and no phase that "
                              f"records them ({' or '.join(recorders)}) comes before phase {i}")
        specs.append(PhaseSpec(i + 1, p.name or f"{i + 1}-{short_kind(p.kind)}", p.kind, select, p.steps,
                               float(p.epochs), p.lr, p.batch_size, p.temperature, p.limit, float(p.replay), fallback,
                               passes, getattr(p, "carry_to", "") or ""))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"phases: names must be unique, got {names}")
    return [resolve_carry(specs, s, traits) if s.passes > 0 else s for s in specs]


def resolve_carry(specs: Sequence[PhaseSpec], spec: PhaseSpec, traits: Mapping[str, PhaseTraits]) -> PhaseSpec:
    """``carry_to`` named (a later phase) or found: the next phase that spends a token budget ('' if none)."""
    later = list(specs[spec.number:])
    if spec.carry_to:
        target = next((s for s in later if s.name == spec.carry_to), None)
        if target is None or not traits[target.kind].trains or target.passes > 0 or target.epochs > 0:
            raise ConfigError(f"phases.{spec.number - 1}.carry_to={spec.carry_to!r}: not a later training phase "
                              f"that runs `steps` (later: {', '.join(s.name for s in later) or 'none'})")
        return spec
    target = next((s for s in later if traits[s.kind].token_budgeted), None)
    return replace(spec, carry_to=target.name if target is not None else "")


def fingerprint(specs: Sequence[PhaseSpec], rules: Sequence[dict], data_digest: str) -> str:
    """A digest of the plan, the rules and the training data: a resumed run must match it (unless forced). Fields
    added later count only when set, so a plan that does not use them keeps the digest it had."""
    plan = [{k: v for k, v in asdict(s).items() if k not in ("passes", "carry_to") or v} for s in specs]
    text = json.dumps({"plan": plan, "rules": list(rules), "data": data_digest},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(specs: Sequence[PhaseSpec], traits: Mapping[str, PhaseTraits]) -> list[str]:
    """One line per phase, for --dry-run and the log."""
    out = []
    for s in specs:
        unit = traits[s.kind].step_unit if s.kind in traits else "step"
        count = "" if not unit else f", {s.epochs:g} epochs" if s.epochs > 0 else \
            f", {s.passes:g} passes, at most {s.steps} steps (the rest to {s.carry_to or 'no phase'})" if s.passes > 0 \
            else f", {s.steps} steps"
        extra = "".join(f", {k} {v}" for k, v in (("lr", s.lr), ("batch", s.batch_size), ("temperature", s.temperature),
                                                   ("limit", s.limit or None), ("replay", s.replay or None),
                                                   ("fallback", s.fallback or None))
                        if v is not None)
        out.append(f"{s.name}: {s.kind} on {s.select}{count}{extra}")
    return out
