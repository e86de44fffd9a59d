"""Greedy pass@1 and sampled pass@k over a problem set, broken down by difficulty level.

pass@1 is greedy decoding (one sample at temperature 0). With ``k`` samples at the configured
temperature, a problem's pass rate is p = correct / k and pass@k is 1 when any sample is correct
(the unbiased estimator of Chen et al. 2021 with n = k); the fractions of problems in each bucket (easy,
medium, hard: by default p = 1, 0 < p < 1, p = 0; a run passes its routing's bands,
:mod:`stagewise_pl.buckets`) are reported too. Per-level and overall means are
aggregated with torchmetrics, so they reduce across ranks the same way training metrics do.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torchmetrics.aggregation import MeanMetric

from stagewise_pl.buckets import BUCKET_ORDER, DEFAULT_BANDS, PassRateBands
from stagewise_pl.data.problems import Problem
from stagewise_pl.rollout.base import SamplingParams

ALL = "all"


@dataclass
class EvalResult:
    """Per level (and ``all``): problems, greedy pass@1, mean sampled pass rate, pass@k."""

    name: str
    k: int
    by_level: dict[str, dict[str, float]] = field(default_factory=dict)
    # problem id -> [greedy reward, sampled pass rate or None]: where each held-out problem stands (the
    # flow of problems between buckets from one evaluation to the next)
    problems: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "k": self.k, "by_level": self.by_level, "problems": self.problems}


def _level_key(problem: Problem) -> str:
    return problem.level if problem.level is not None else ALL


def evaluate_problems(engine, render: Callable[[str], str], verifier, problems: Sequence[Problem], name: str,
                      k: int = 8, temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                      bands: PassRateBands = DEFAULT_BANDS) -> EvalResult:
    prompts = [render(p.prompt) for p in problems]  # the run's PromptRenderer
    golds = [p.answer for p in problems]
    greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens),
                             desc=f"eval {name} greedy")
    greedy_rewards = [v.reward for v in verifier.score_batch(greedy.texts, golds)]
    sampled_rates, any_correct = [None] * len(problems), [None] * len(problems)
    if k > 0:
        sampled = engine.generate(prompts, SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens,
                                                          seed=seed), desc=f"eval {name} pass@{k}")
        rewards = [v.reward for v in verifier.score_batch(sampled.texts, [g for g in golds for _ in range(k)])]
        for i in range(len(problems)):
            r = rewards[i * k:(i + 1) * k]
            sampled_rates[i], any_correct[i] = sum(r) / k, float(max(r) > 0)
    levels = sorted({_level_key(p) for p in problems}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    metrics: dict[str, dict[str, MeanMetric]] = OrderedDict(
        # one process evaluates (rank 0 under DDP): the metrics must not wait for the others
        (lvl, {name: MeanMetric(sync_on_compute=False) for name in ("pass@1", "mean_p", f"pass@{k}", *BUCKET_ORDER)})
        for lvl in levels + [ALL])
    counts = {lvl: 0 for lvl in levels + [ALL]}
    for i, p in enumerate(problems):
        for lvl in {_level_key(p), ALL}:
            counts[lvl] += 1
            metrics[lvl]["pass@1"].update(torch.tensor(greedy_rewards[i]))
            if k > 0:
                metrics[lvl]["mean_p"].update(torch.tensor(sampled_rates[i]))
                metrics[lvl][f"pass@{k}"].update(torch.tensor(any_correct[i]))
                bucket = bands.bucket(sampled_rates[i])
                for name in BUCKET_ORDER:
                    metrics[lvl][name].update(torch.tensor(float(name == bucket)))
    result = EvalResult(name=name, k=k, problems={p.id: [float(greedy_rewards[i]), sampled_rates[i]]
                                                  for i, p in enumerate(problems)})
    for lvl, ms in metrics.items():
        row = {"n": counts[lvl], "pass@1": float(ms["pass@1"].compute())}
        if k > 0:
            row["mean_p"] = float(ms["mean_p"].compute())
            row[f"pass@{k}"] = float(ms[f"pass@{k}"].compute())
            row.update({name: float(ms[name].compute()) for name in BUCKET_ORDER})
        result.by_level[lvl] = row
    return result


def format_table(columns: "OrderedDict[str, EvalResult]") -> str:
    """A Markdown table: one row per level; per labelled result greedy pass@1, mean p and the bucket fractions."""
    labels = list(columns)
    levels = list(next(iter(columns.values())).by_level)
    header = ("| level | n | " + " | ".join(f"{lab} pass@1 | {lab} mean p | {lab} easy/medium/hard" for lab in labels)
              + " |")
    lines = [header, "|" + "---|" * (2 + 3 * len(labels))]
    for lvl in levels:
        cells = []
        for lab in labels:
            row = columns[lab].by_level.get(lvl, {})
            buckets = "/".join(f"{row[b]:.2f}" for b in BUCKET_ORDER) if "easy" in row else "-"
            mean_p = f"{row['mean_p']:.3f}" if "mean_p" in row else "-"
            cells += [f"{row.get('pass@1', float('nan')):.2f}", mean_p, buckets]
        n = next(iter(columns.values())).by_level[lvl]["n"]
        lines.append(f"| {lvl} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_table(columns: "OrderedDict[str, EvalResult]") -> str:
    """The console's table: one row per labelled result (before, after each phase), greedy pass@1 by level and
    over all; narrow enough for a terminal whatever the number of phases (the wide table is :func:`format_table`)."""
    levels = list(next(iter(columns.values())).by_level)
    names = [f"L{lvl}" if lvl != "all" else "all" for lvl in levels]
    width = max(len("after"), *(len(lab) for lab in columns))
    lines = [f"{'after':<{width}}  " + " ".join(f"{n:>5}" for n in names)]
    for lab, res in columns.items():
        lines.append(f"{lab:<{width}}  " + " ".join(f"{res.by_level.get(lvl, {}).get('pass@1', float('nan')):5.2f}"
                                                   for lvl in levels))
    return "\n".join(lines)
