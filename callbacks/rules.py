"""The built-in routing rules (Lightning Callbacks with a ``route`` method; see :mod:`stagewise_pl.routing`).

- :class:`RouteByPassRate` -- the method's routing: pass rate p in the latest profile phase; p <= ``hard_max``
  -> ``hard`` (SFT), p >= ``easy_min`` -> ``easy`` (retired), otherwise ``medium`` (RL). Its bands
  (:class:`~stagewise_pl.buckets.PassRateBands`) are the run's definition of the buckets: profile summaries and
  evaluations count with them too.
- :class:`NeverSolvedInRL` -- problems the latest GRPO phase sampled and never solved -> ``unsolved_in_rl`` (the
  input of critique fine-tuning).
"""
from __future__ import annotations

from stagewise_pl.buckets import PassRateBands
from stagewise_pl.routing import RoutingRule, RoutingView


class RouteByPassRate(RoutingRule):
    name = "route_by_pass_rate"
    buckets = ("hard", "medium", "easy")
    reads = "profile"

    def __init__(self, hard_max: float = 0.0, easy_min: float = 1.0):
        try:
            self.bands = PassRateBands(hard_max, easy_min)
        except ValueError as exc:
            raise TypeError(str(exc)) from None

    def profile_key(self, rate: float) -> str:
        return self.bands.bucket(rate)

    def route(self, view: RoutingView, buckets: dict) -> dict:
        profile = view.last("profile")
        out = {**buckets, "hard": [], "medium": [], "easy": []}
        if profile is None:
            return out
        for pid, p in view.pass_rates(profile).items():
            out[self.bands.bucket(p)].append(pid)
        return out


class NeverSolvedInRL(RoutingRule):
    name = "never_solved_in_rl"
    buckets = ("unsolved_in_rl",)
    reads = "grpo"

    def route(self, view: RoutingView, buckets: dict) -> dict:
        phase = view.last("grpo")
        ids = [] if phase is None else [pid for pid, p in view.pass_rates(phase).items() if p == 0.0]
        return {**buckets, "unsolved_in_rl": ids}
