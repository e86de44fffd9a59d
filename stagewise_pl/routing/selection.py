"""From the rules' buckets to a phase's problems and replay: pure functions, tested without a Trainer.

:func:`choose_bucket` asks the rules for the buckets and the ids a phase's ``select`` names (its ``fallback``
bucket when that one is empty). :func:`select_problems` turns those ids, the phase spec, the pool and the run's
seed into the phase's problems: the kind's level filter, a seeded ``limit`` draw, and for supervised phases a
seeded ``replay`` share from the rest of the pool (with ``data.replay_target=own``, each replayed problem with
one of the student's own correct solutions). The result is the routing decision written to
``routing/NN-<phase>.json`` and kept in checkpoints, so a resumed phase gets the same problems.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from stagewise_pl.plan import PhaseSpec, PhaseTraits
from stagewise_pl.routing.rules import RoutingView, route, rule_name, selector_rule


def choose_bucket(select: str, rules: Sequence, view: RoutingView) -> tuple[dict[str, list[str]], set[str]]:
    """The buckets the rules build and the ids ``select`` names: a bucket, or a rule by dotted path (run after the
    configured ones: the buckets it builds, or those it changed)."""
    if ":" in select:
        rule = selector_rule(select)
        before = route(rules, view)
        buckets = route(list(rules) + [rule], view)
        names = getattr(rule, "buckets", ()) or [k for k in buckets if buckets[k] != before.get(k)]
        return buckets, {pid for name in names for pid in buckets.get(name, [])}
    buckets = route(rules, view)
    return buckets, set(buckets.get(select, []))


def route_phase(spec: PhaseSpec, rules: Sequence, view: RoutingView,
                log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, list[str]], set[str]]:
    """The buckets and the chosen ids of ``spec``: its ``select``, else its ``fallback`` when that is empty."""
    buckets, chosen = choose_bucket(spec.select, rules, view)
    if not chosen and spec.fallback:
        log(f"phase {spec.name}: bucket {spec.select!r} is empty; falling back to {spec.fallback!r}")
        more, chosen = choose_bucket(spec.fallback, rules, view)
        buckets = {**buckets, **more}
    return buckets, chosen


@dataclass
class Selection:
    """A phase's problems (selected, then replayed) and how they were chosen; ``decision()`` is the JSON."""

    phase: str
    kind: str
    select: str
    selected: list  # the Problems the phase works on: chosen ones, then replayed ones
    replay: list[str] = field(default_factory=list)  # ids of the replayed problems
    replay_targets: dict[str, str] = field(default_factory=dict)  # replayed id -> its own solution (replay_target=own)
    rules: list[str] = field(default_factory=list)
    buckets: dict[str, list[str]] = field(default_factory=dict)
    error: Optional[str] = None

    def decision(self) -> dict:
        return {"phase": self.phase, "kind": self.kind, "select": self.select, "replay": list(self.replay),
                **({"replay_targets": self.replay_targets} if self.replay_targets else {}),
                "rules": self.rules, "counts": {name: len(ids) for name, ids in self.buckets.items()},
                "ids": self.buckets, "selected": [p.id for p in self.selected], "error": self.error}


def select_problems(spec: PhaseSpec, traits: PhaseTraits, source: Sequence, chosen: Optional[set[str]], seed: int,
                    levels: Sequence = (), limit: int = 0, solved: Optional[dict[str, list[str]]] = None,
                    buckets: Optional[dict] = None, rules: Sequence[str] = ()) -> Selection:
    """The phase's problems. ``source``: the pool it draws from (in pool order); ``chosen``: the ids its bucket
    holds (None: ``select=all``); ``levels``/``limit``: its kind's level filter and problem limit; ``solved``:
    problem id -> the student's correct texts, when replay trains on them (``data.replay_target=own``)."""
    candidates = [] if not traits.uses_pool else list(source) if chosen is None else \
        [p for p in source if p.id in chosen]
    error = None
    if levels:
        wanted = {str(v) for v in levels}
        kept = [p for p in candidates if str(p.level) in wanted]
        if candidates and not kept:
            error = f"{spec.kind}.levels={list(levels)}: none of the {len(candidates)} problems phase {spec.name} " \
                    f"selected ({spec.select}) is at these levels"
        candidates = kept
    limit = spec.limit or limit
    if limit and limit < len(candidates):
        # seeded by the run alone: profiles with the same limit see the same problems, before and after training
        keep = np.random.default_rng([seed]).choice(len(candidates), limit, replace=False)
        candidates = [candidates[i] for i in sorted(keep)]
    replay, own = replay_draw(spec, source, candidates, seed, solved)
    return Selection(spec.name, spec.kind, spec.select, candidates + replay, [p.id for p in replay], own,
                     list(rules) if chosen is not None else [], dict(buckets or {}), error)


def replay_draw(spec: PhaseSpec, source: Sequence, candidates: Sequence, seed: int,
                solved: Optional[dict[str, list[str]]]) -> tuple[list, dict[str, str]]:
    """A ``spec.replay`` share of the phase's examples from the problems it did not select (seeded by the run and
    the phase); with ``solved``, only problems the student solved, each with one of its solutions."""
    if spec.replay <= 0 or not candidates:
        return [], {}
    taken = {p.id for p in candidates}
    rest = [p for p in source if p.id not in taken]
    if solved is not None:
        rest = [p for p in rest if p.id in solved]
    count = min(len(rest), round(len(candidates) * spec.replay / (1.0 - spec.replay)))
    if not count:
        return [], {}
    keep = np.random.default_rng([seed, spec.number, 1]).choice(len(rest), count, replace=False)
    replay = [rest[i] for i in sorted(keep)]
    own: dict[str, str] = {}
    if solved is not None:
        rng = np.random.default_rng([seed, spec.number, 2])
        own = {p.id: solved[p.id][int(rng.integers(len(solved[p.id])))] for p in replay}
    return replay, own


def rule_names(rules: Sequence) -> list[str]:
    return [rule_name(r) for r in rules]
