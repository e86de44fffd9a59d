"""Routing: which problems each phase works on.

- :class:`RoutingRule` -- a plug-in (a Lightning ``Callback`` named by dotted path in ``routing.rules``) whose
  ``route(view, buckets)`` reads the difficulty ledger and the pool and returns buckets of problem ids. Rules run
  in order, each seeing the buckets of the ones before it. The built-in rules live in the repository's
  ``callbacks/`` folder, installed as ``stagewise_pl.callbacks`` (``stagewise_pl.callbacks.rules``).
- :class:`RoutingView` -- what a rule sees at a phase boundary.
- :mod:`stagewise_pl.routing.selection` -- from the buckets to a phase's problems and replay, a pure function.
"""
from stagewise_pl.routing.rules import (RoutingRule, RoutingView, make_rules, route, rule_name, selector_rule,
                                        translate_path)

__all__ = ["RoutingRule", "RoutingView", "make_rules", "route", "rule_name", "selector_rule", "translate_path"]
