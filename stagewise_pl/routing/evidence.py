"""A profile's evidence on each problem, and when it suffices: pure functions, tested without a model.

A full profile draws ``k`` samples of every problem. Three things make it cheaper (``profile.*`` options):

- **sequential** sampling: a problem is sampled ``round`` at a time and stops once its bucket is decided, that is
  once every pass rate the remaining samples could still produce falls in the same cell of every routing rule that
  reads profiles. The cells are the rules' own: each such rule says how it classifies a pass rate
  (``RoutingRule.profile_key``), so no threshold is spelled twice. Under the default bands a success and a failure
  decide ``medium`` at once; ``hard`` and ``easy`` need all k.
- **reuse**: rollouts the ledger already holds for the problem under the same policy count as samples.
- **carry**: a problem all-failed (or all-correct) in each of the last ``carry`` profiles, with every rollout since
  agreeing and (by default) not trained on since, is sampled ``confirm`` times; if they agree the bucket stands,
  else the problem is profiled anew.

Each problem's :class:`Tally` says which evidence counted (``how``, ``from``); the profile's tallies are written
with its routing decision and are what the routing rules read as its pass rates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

HOW = ("sampled", "early", "reused", "carried", "kept")


@dataclass
class Tally:
    """The evidence on one problem in one profile."""

    correct: int = 0  # correct samples counted (fresh, reused and carried)
    n: int = 0  # samples counted
    fresh: int = 0  # samples this profile drew
    fresh_correct: int = 0
    source: str = ""  # the phases whose rollouts counted besides this profile's own ("" = none)
    carried: Optional[int] = None  # 1 / 0: the all-correct / all-failed outcome carried forward, to be confirmed
    how: str = "sampled"

    @property
    def rate(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict:
        return {"c": self.correct, "n": self.n, "fresh": self.fresh, "how": self.how,
                **({"from": self.source} if self.source else {})}


def rate_key(rules: Sequence) -> tuple[Optional[Callable[[float], Hashable]], str]:
    """How the rules that read profiles classify a pass rate, as one function (None when one of them does not
    say: a profile then takes all k samples), and a reason for the log."""
    readers = [r for r in rules if getattr(r, "reads", None) == "profile"]
    silent = [type(r).__name__ for r in readers if not callable(getattr(r, "profile_key", None))]
    if silent:
        return None, f"routing rule(s) {', '.join(silent)} read profiles but declare no profile_key(rate)"
    return (lambda rate: tuple(r.profile_key(rate) for r in readers)), ""


def decided(correct: int, n: int, k: int, key: Callable[[float], Hashable]) -> bool:
    """Whether ``correct`` of ``n`` samples decide the cell of a problem profiled with ``k``: every final rate the
    ``k - n`` samples left could give (and the rate so far, which the routing reads) falls in one cell."""
    if n >= k:
        return True
    if n == 0:
        return False
    cells = {key((correct + j) / k) for j in range(k - n + 1)}
    return len(cells) == 1 and key(correct / n) in cells


def wanted(t: Tally, k: int, confirm: int, round_size: int, key: Optional[Callable]) -> int:
    """Samples to draw for ``t`` in the next round (0: its evidence suffices)."""
    if t.carried is not None:
        return max(0, confirm - t.fresh)
    if t.n >= k:
        return 0
    if key is None:
        return k - t.n
    if decided(t.correct, t.n, k, key):
        return 0
    return min(round_size, k - t.n)


def add(t: Tally, outcomes: Sequence[bool]) -> Tally:
    """``t`` with fresh outcomes added; a carried outcome that one of them contradicts is dropped, with the
    evidence it brought: the problem is then profiled on its fresh samples alone."""
    t.fresh += len(outcomes)
    t.fresh_correct += sum(bool(o) for o in outcomes)
    if t.carried is not None and any(bool(o) != bool(t.carried) for o in outcomes):
        t.carried, t.correct, t.n, t.source = None, t.fresh_correct, t.fresh, ""
        return t
    t.correct += sum(bool(o) for o in outcomes)
    t.n += len(outcomes)
    return t


def finish(t: Tally, k: int) -> Tally:
    """Name the evidence that decided the problem (``how``)."""
    t.how = ("carried" if t.carried is not None else "reused" if t.source else "early" if t.n < k else "sampled")
    return t


def carried_outcome(history: Sequence[Optional[tuple[int, int]]], since: tuple[int, int]) -> Optional[int]:
    """1 (or 0) when the problem was all-correct (all-failed) in every profile of ``history`` ((correct, n) per
    profile, None = not profiled there) and every rollout ``since`` the latest agrees; else None."""
    if not history or any(h is None or h[1] == 0 for h in history):
        return None
    if all(c == n for c, n in history) and since[0] == since[1]:
        return 1
    if all(c == 0 for c, _ in history) and since[0] == 0:
        return 0
    return None
