"""The verifier contract: ``score(completion, gold) -> Verdict(reward, reason)``, completion only, never the prompt."""
from __future__ import annotations

from dataclasses import dataclass

from stagewise_pl.registry import Registry

REASONS = ("correct", "wrong", "no_answer", "unevaluated", "ungradable_gold", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    reward: float
    reason: str

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown verdict reason {self.reason!r}; one of {REASONS}")


VERIFIERS: Registry = Registry("verifier")


def get_verifier(name: str, **kwargs):
    """An instance of the verifier registered as ``name`` (or at a dotted path)."""
    return VERIFIERS.get(name)(**kwargs)
