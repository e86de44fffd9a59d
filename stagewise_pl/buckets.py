"""The buckets the method routes by, defined once: a pass rate p falls in ``hard``, ``medium`` or ``easy``.

``PassRateBands(hard_max, easy_min)``: p <= hard_max is hard (SFT), p >= easy_min is easy (retired),
anything between is medium (RL). The defaults (0 and 1) are the method's: never solved, always solved,
partly solved. The routing rule (``callbacks/rules.py: RouteByPassRate``) routes with its bands; profile
summaries, held-out evaluations and reports count with the same bands, so "hard" means one thing in a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

BUCKET_ORDER = ("easy", "medium", "hard")


@dataclass(frozen=True)
class PassRateBands:
    hard_max: float = 0.0
    easy_min: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.hard_max < self.easy_min <= 1.0:
            raise ValueError(f"needs 0 <= hard_max < easy_min <= 1, got hard_max={self.hard_max}, "
                             f"easy_min={self.easy_min}")

    def bucket(self, rate: float) -> str:
        """``hard``, ``medium`` or ``easy`` for a pass rate."""
        return "hard" if rate <= self.hard_max else "easy" if rate >= self.easy_min else "medium"

    def counts(self, rates: Iterable[float]) -> dict[str, int]:
        """Problems per bucket, in BUCKET_ORDER."""
        out = {name: 0 for name in BUCKET_ORDER}
        for rate in rates:
            out[self.bucket(rate)] += 1
        return out


DEFAULT_BANDS = PassRateBands()


def bands_of(rules: Iterable) -> PassRateBands:
    """The bands of the first rule that routes by pass rate (it has a ``bands`` attribute), else the defaults."""
    return next((r.bands for r in rules if isinstance(getattr(r, "bands", None), PassRateBands)), DEFAULT_BANDS)
