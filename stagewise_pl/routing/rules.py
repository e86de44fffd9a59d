"""Routing rules: the plug-in interface, applying rules in order, and building them from the configuration."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import lightning as L

from stagewise_pl.config import ConfigError
from stagewise_pl.plan import PhaseSpec
from stagewise_pl.registry import import_dotted


@dataclass
class RoutingView:
    """What a routing rule sees at a phase boundary."""

    ledger: Any  # the run's DifficultyLedger
    pool: dict  # problem id -> Problem: the gradable training pool
    done: list  # PhaseSpec of the phases already run, in order
    phase: PhaseSpec  # the phase about to start
    # profile name -> problem id -> the evidence its rates count ({"c", "n", "how", ...}, see routing.evidence);
    # a profile without it is read from the ledger
    evidence: dict = field(default_factory=dict)

    def last(self, kind: str) -> Optional[PhaseSpec]:
        """The most recent finished phase of ``kind``."""
        for spec in reversed(self.done):
            if spec.kind == kind:
                return spec
        return None

    def phases(self, kind: str) -> list[PhaseSpec]:
        return [spec for spec in self.done if spec.kind == kind]

    def pass_rates(self, phase: PhaseSpec) -> dict[str, float]:
        """Pool problem id -> pass rate in ``phase`` (problems it graded)."""
        if phase.name in self.evidence:
            return {pid: e["c"] / e["n"] for pid, e in self.evidence[phase.name].items() if pid in self.pool and e["n"]}
        return {pid: rate for pid, rate in self.ledger.pass_rates(phase.name).items() if pid in self.pool}


class RoutingRule(L.Callback):
    """Base class of routing rules. ``buckets``: the names it builds; ``reads``: the phase kind it reads."""

    name: str = ""
    buckets: tuple[str, ...] = ()
    reads: Optional[str] = None
    # a rule that reads profiles by pass rate defines ``profile_key(rate) -> hashable``: rates with the same key route
    # alike. A sequential profile stops sampling a problem once the key of every rate it could still reach is one
    # (stagewise_pl.routing.evidence); a profile-reading rule without it makes profiles take all k samples.
    profile_key = None

    def route(self, view: RoutingView, buckets: dict[str, list[str]]) -> dict[str, list[str]]:
        raise NotImplementedError


def route(rules: Sequence, view: RoutingView) -> dict[str, list[str]]:
    """Apply the rules in order; every bucket is a sorted list of pool problem ids."""
    buckets: dict[str, list[str]] = {}
    for rule in rules:
        out = rule.route(view, {k: list(v) for k, v in buckets.items()})
        if not isinstance(out, dict) or not all(isinstance(v, (list, tuple, set)) for v in out.values()):
            raise TypeError(f"routing rule {rule_name(rule)} must return a dict of bucket -> problem ids, got {out!r}")
        unknown = sorted({pid for ids in out.values() for pid in ids if pid not in view.pool})
        if unknown:
            raise ValueError(f"routing rule {rule_name(rule)} routed ids that are not in the pool: {unknown[:5]}")
        buckets = {str(k): sorted(set(v)) for k, v in out.items()}
    return buckets


def rule_name(rule) -> str:
    return getattr(rule, "name", "") or type(rule).__name__


OLD_PREFIX, NEW_PREFIX = "callbacks.", "stagewise_pl.callbacks."


def translate_path(path: str, where: str) -> str:
    """A dotted path under the old top-level ``callbacks`` package, now installed as ``stagewise_pl.callbacks``:
    accepted with a deprecation message (a path of a user's own package is returned as it is)."""
    if path.startswith(OLD_PREFIX):
        new = NEW_PREFIX + path[len(OLD_PREFIX):]
        warnings.warn(f"{where}: {path!r} is deprecated; the callbacks are installed as stagewise_pl.callbacks: "
                      f"write {new!r}", FutureWarning, stacklevel=2)
        return new
    return path


def selector_rule(path: str):
    """The rule a phase's ``select`` names by dotted path (built with no arguments)."""
    try:
        rule = import_dotted(translate_path(path, "select"))()
    except (ImportError, TypeError) as exc:
        raise ConfigError(f"select={path!r}: {exc}") from None
    if not callable(getattr(rule, "route", None)):
        raise ConfigError(f"select={path!r} is not a routing rule (no route(view, buckets) method)")
    return rule


def make_rules(configs) -> list:
    """Instantiate ``routing.rules`` (dotted paths); errors name the rule's key."""
    rules = []
    for i, rc in enumerate(configs):
        key = f"routing.rules.{i}"
        try:
            cls = import_dotted(translate_path(rc.target, f"{key}.target"))
        except ImportError as exc:
            raise ConfigError(f"{key}.target: {exc}") from None
        try:
            rule = cls(**rc.args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}.args: {rc.target}: {exc}") from None
        if not callable(getattr(rule, "route", None)) or not isinstance(rule, L.Callback):
            raise ConfigError(f"{key}.target: {rc.target} is not a routing rule (a Lightning Callback with "
                              f"a route(view, buckets) method)")
        rules.append(rule)
    return rules
