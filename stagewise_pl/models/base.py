"""The tiny base model's cache: its key, and the warm-up's data (level weights, rewrite examples).

The cache key is a hash of everything that determines the weights (tiny shape, warm-up settings,
task definition, format version), so a second run -- or another array task -- reuses the same
base model, and a changed setting builds a new one. The directory is built under a temporary name
and renamed into place, under a file lock, so concurrent runs never see half a model. The warm-up itself is a
training phase: :mod:`stagewise_pl.phases.warmup` builds the base (this module trains nothing).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Callable

from stagewise_pl.data.problems import Problem
from stagewise_pl.io import atomic_dir

# bumped when the code that builds the base changes its weights for the same settings, so that a cached base is
# never one an older build made: 2: SFT through the fused NLL kernel; 3: the fused kernels leave ignored rows
# out (7c8a76a: the same loss, summed in another order, so a 700-step warm-up ends elsewhere)
FORMAT_VERSION = 3


def base_key(cfg) -> str:
    t = cfg.task  # the plain levels alone: the base model never sees the skill levels
    task = {"seed": t.seed, "levels": [{"steps": lv.steps, "max_operand": lv.max_operand} for lv in t.levels],
            "train_per_level": t.train_per_level, "test_per_level": t.test_per_level}
    blob = json.dumps({"v": FORMAT_VERSION, "tiny": dataclasses.asdict(cfg.model.tiny),
                       "warmup": dataclasses.asdict(cfg.model.warmup), "task": task,
                       "optim": dataclasses.asdict(cfg.optim), "max_length": cfg.trainer.max_length,
                       "packing": cfg.trainer.packing, "rewrite_template": rewrite_template(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rewrite_template(cfg) -> str:
    """The bridge_rewrite prompt the warm-up teaches to read ('' when model.warmup.rewrite_share is 0)."""
    if cfg.model.warmup.rewrite_share <= 0:
        return ""
    from stagewise_pl.config import load_prompts

    return load_prompts(cfg.prompts).get("bridge_rewrite", "")


def rewrite_examples(task, problems: list[Problem], template: str, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, target) per problem: the problem with a coarser correct trace as the reference (2 or 3
    operations per line, seeded), and the one-operation-per-line trace to write."""
    import random

    rng = random.Random(seed)
    out = []
    for p in problems:
        steps, sizes = task.steps_of(p.prompt), []
        while sum(sizes) < steps:
            sizes.append(min(rng.randint(2, 3), steps - sum(sizes)))
        out.append((template.format(problem=p.prompt, reference=task.chunked_trace(p.prompt, sizes)),
                    p.teacher_traces[0]))
    return out


def warmup_weights(problems: list[Problem], level_weights: list[float]) -> list[float]:
    """Per-example sampling weights so that each level gets its configured share of the warm-up."""
    per_level: dict[int, int] = {}
    for p in problems:
        per_level[p.meta["level"]] = per_level.get(p.meta["level"], 0) + 1
    return [level_weights[p.meta["level"] - 1] / per_level[p.meta["level"]] for p in problems]


def cached_base(cfg, build: Callable[[Path], None]) -> Path:
    """Path of the cached tiny base model of ``cfg`` (``model.cache_dir``/tiny-base-<key>), made by ``build(directory)``
    when missing: built under a temporary name and renamed into place, under a file lock, so concurrent runs never
    see half a model and build it once. The builder (random init + the warm-up, a training phase) is
    :func:`stagewise_pl.phases.warmup.tiny_base_model`'s: this module trains nothing."""
    cache = Path(cfg.model.cache_dir).expanduser()
    target = cache / f"tiny-base-{base_key(cfg)}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # built by another process meanwhile
            return target
        with atomic_dir(target) as tmp:
            build(tmp)
    return target


def write_base_record(cfg, directory: Path) -> None:
    """``stagewise_base.json``: the key and warm-up settings a built base was made with."""
    (directory / "stagewise_base.json").write_text(json.dumps({"key": base_key(cfg),
                                                              "warmup": dataclasses.asdict(cfg.model.warmup)}))
