"""An example of a routing rule written outside the core: it changes the routing without touching the core.
Put it after ``stagewise_pl.callbacks.rules:RouteByPassRate`` in ``routing.rules``::

    routing:
      rules:
        - target: stagewise_pl.callbacks.rules:RouteByPassRate
        - target: stagewise_pl.callbacks.promote:PromoteAboveThreshold
          args: {threshold: 0.25}

A problem is promoted to RL (``medium``) only once its pass rate in the latest profile reaches
``threshold``; below it, a partly solved problem stays with SFT (``hard``). The ids it moved are
listed in the bucket ``promoted``, problems that were ``hard`` in the profile before and are RL-ready
now.
"""
from __future__ import annotations

from stagewise_pl.routing import RoutingRule, RoutingView


class PromoteAboveThreshold(RoutingRule):
    name = "promote_above_threshold"
    buckets = ("promoted",)
    reads = "profile"

    def __init__(self, threshold: float = 0.25):
        if not 0.0 < threshold < 1.0:
            raise TypeError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def profile_key(self, rate: float) -> bool:
        return rate >= self.threshold

    def route(self, view: RoutingView, buckets: dict) -> dict:
        profiles = view.phases("profile")
        if not profiles:
            return {**buckets, "promoted": []}
        rates = view.pass_rates(profiles[-1])
        medium = [pid for pid in buckets.get("medium", []) if rates.get(pid, 0.0) >= self.threshold]
        held = [pid for pid in buckets.get("medium", []) if rates.get(pid, 0.0) < self.threshold]
        before = view.pass_rates(profiles[-2]) if len(profiles) > 1 else {}
        promoted = [pid for pid in medium if before.get(pid, 0.0) < self.threshold]
        return {**buckets, "medium": medium, "hard": list(buckets.get("hard", [])) + held, "promoted": promoted}
