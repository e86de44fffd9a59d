"""The built-in stage rules (Lightning Callbacks with a ``route`` method; see stagewise_pl.stages).

- :class:`RouteByPassRate` — the method's routing: pass rate p in the latest profile phase;
  p <= ``hard_max`` → ``hard`` (SFT), p >= ``easy_min`` → ``easy`` (retired), otherwise ``medium`` (RL).
- :class:`NeverSolvedInRL` — problems the latest GRPO phase sampled and never solved →
  ``unsolved_in_rl`` (the input of critique fine-tuning).
"""
from __future__ import annotations

from stagewise_pl.stages import RoutingView, StageRule


class RouteByPassRate(StageRule):
    name = "route_by_pass_rate"
    buckets = ("hard", "medium", "easy")
    reads = "profile"

    def __init__(self, hard_max: float = 0.0, easy_min: float = 1.0):
        if not 0.0 <= hard_max < easy_min <= 1.0:
            raise TypeError(f"needs 0 <= hard_max < easy_min <= 1, got hard_max={hard_max}, easy_min={easy_min}")
        self.hard_max, self.easy_min = hard_max, easy_min

    def route(self, view: RoutingView, buckets: dict) -> dict:
        profile = view.last("profile")
        out = {**buckets, "hard": [], "medium": [], "easy": []}
        if profile is None:
            return out
        for pid, p in view.pass_rates(profile).items():
            out["hard" if p <= self.hard_max else "easy" if p >= self.easy_min else "medium"].append(pid)
        return out


class NeverSolvedInRL(StageRule):
    name = "never_solved_in_rl"
    buckets = ("unsolved_in_rl",)
    reads = "grpo"

    def route(self, view: RoutingView, buckets: dict) -> dict:
        phase = view.last("grpo")
        ids = [] if phase is None else [pid for pid, p in view.pass_rates(phase).items() if p == 0.0]
        return {**buckets, "unsolved_in_rl": ids}
