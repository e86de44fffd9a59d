"""The development split: a seeded slice of the training pool that no phase trains on or profiles, graded after
every training phase so that a phase gate (:mod:`stagewise_pl.routing.gate`) can tell whether the phase helped.

:func:`carve_dev` takes ``data.dev_size`` gradable problems out of the pool (a draw seeded by ``run.seed``, so every
arm of an experiment with one seed gets the same split); :class:`DevSplit` grades them by label (``before``, a
phase's name) through the sampling seam, greedy (``data.dev_k = 0``) or ``dev_k`` samples at
``eval.temperature``, and keeps each result in ``<run>/dev/<label>.json`` so a resumed run does not grade twice.
The tokens it generates are counted in the run's budget: the manager adds them to the phase's summary. Never the
held-out test split.
"""
from __future__ import annotations

import json
import math
import random
from typing import Callable, Optional, Sequence

from stagewise_pl.io import atomic_write
from stagewise_pl.rollout.base import SamplingParams


def carve_dev(pool: Sequence, size: int, seed: int) -> tuple[list, list]:
    """``(training pool, development split)``: ``size`` problems drawn from the gradable ones, seeded; the pool keeps
    its order. ``size`` 0: the pool whole and no split."""
    from stagewise_pl.verify.gold import gradable

    if size <= 0:
        return list(pool), []
    candidates = sorted(p.id for p in gradable(pool))
    if size >= len(candidates):
        raise ValueError(f"data.dev_size={size} leaves no gradable problem to train on (the pool has "
                         f"{len(candidates)}); lower it")
    chosen = set(random.Random(f"dev-{seed}").sample(candidates, size))
    return [p for p in pool if p.id not in chosen], [p for p in pool if p.id in chosen]


class DevSplit:
    """The split's problems and their grading by label."""

    def __init__(self, problems: Sequence, k: int, temperature: float, max_new_tokens: int, seed: int, verifier,
                 render: Callable[[str], str], engine: Callable, rundir):
        self.problems, self.k, self.temperature = list(problems), k, temperature
        self.max_new_tokens, self.seed, self.verifier, self.render = max_new_tokens, seed, verifier, render
        self.engine, self.rundir = engine, rundir  # engine: () -> the engine holding the policy's current weights

    def file(self, label: str):
        return self.rundir / "dev" / f"{label}.json"

    def result(self, label: str) -> Optional[dict]:
        path = self.file(label)
        return json.loads(path.read_text()) if path.is_file() else None

    def grade(self, label: str) -> dict:
        """``{"accuracy", "stderr", "n", "k", "tokens", "problems": {id: score}}`` of the policy as it is now (or as
        it was when ``label`` was first graded: the file is read back)."""
        from stagewise_pl.phases.sampling import sample_and_grade

        stored = self.result(label)
        if stored is not None:
            return stored
        n = max(1, self.k)
        sampling = SamplingParams(n=n, temperature=self.temperature if self.k else 0.0,
                                  max_new_tokens=self.max_new_tokens, seed=self.seed)
        groups = sample_and_grade(self.engine(), self.verifier, self.render, self.problems, sampling,
                                  desc=f"dev {label}")
        scores = (groups.rewards > 0).float().mean(-1).tolist()  # a problem's share of correct samples
        out = {"label": label, "n": len(scores), "k": self.k, "accuracy": sum(scores) / len(scores),
               "stderr": stderr(scores), "tokens": sum(len(c) for c in groups.completion_ids),
               "problems": {p.id: s for p, s in zip(self.problems, scores)}}
        atomic_write(self.file(label), json.dumps(out, indent=1))
        return out


def stderr(scores: Sequence[float]) -> float:
    """The standard error of the mean of per-problem scores, at least that of one problem in ``n`` flipping
    (a split on which every problem scores alike has no spread to measure, not no noise)."""
    n = len(scores)
    mean = sum(scores) / n
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, n - 1) / n)
    return max(spread, 1.0 / n)
