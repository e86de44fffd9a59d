"""Verifiers: grade a completion against a gold answer. ``get_verifier(name)`` by name or dotted path."""
from stagewise_pl.verify.base import VERIFIERS, Verdict, get_verifier
from stagewise_pl.verify import exact  # noqa: F401  (registers "exact")

__all__ = ["VERIFIERS", "Verdict", "get_verifier"]
