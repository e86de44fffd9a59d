"""The tiny base model: random tiny Qwen2 + warm-up SFT on the synthetic task, cached on disk.

The cache key is a hash of everything that determines the weights (tiny shape, warm-up settings,
task definition, format version), so a second run -- or another array task -- reuses the same
base model, and a changed setting builds a new one. The directory is built under a temporary name
and renamed into place, under a file lock, so concurrent runs never see half a model.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from pathlib import Path

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


def tiny_base_model(cfg, task, log=print) -> Path:
    """Path of the cached tiny base model, building it (random init + warm-up SFT) when missing."""
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
            _build(cfg, task.plain(), tmp, log)  # warmed up on the plain levels: it never sees the skill
    return target


def warmup_runner(cfg, task, policy, tokenizer):
    """The warm-up as an SFT phase run on its own: the task's train split (teacher traces, and a share of
    rewrite examples), sampled by level weight, ``model.warmup`` steps, batch size and learning rate, 50
    learning-rate warm-up steps, batch order seeded by 0."""
    from stagewise_pl.data.examples import build_examples
    from stagewise_pl.data.sft import encode_example
    from stagewise_pl.models.load import render_prompt
    from stagewise_pl.phases import PhaseContext, SFTRunner
    from stagewise_pl.plan import PhaseSpec

    warm = cfg.model.warmup
    problems = task.split("train")
    examples = build_examples(tokenizer, problems, "teacher_trace", cfg.trainer.max_length)
    weights = warmup_weights(problems, warm.level_weights)
    share, template = warm.rewrite_share, rewrite_template(cfg)
    if share > 0 and template:
        examples += [encode_example(tokenizer, render_prompt(tokenizer, prompt), target, cfg.trainer.max_length)
                     for prompt, target in rewrite_examples(task, problems, template)]
        weights = [w * (1 - share) for w in weights] + [w * share for w in weights]
    trainer = dataclasses.replace(cfg.trainer, accumulate_grad_batches=1, devices=1, num_nodes=1, strategy="auto",
                                  log_every_n_steps=50)
    warm_cfg = dataclasses.replace(cfg, trainer=trainer, optim=dataclasses.replace(cfg.optim, warmup_steps=50),
                                   data=dataclasses.replace(cfg.data, target="teacher_trace"))
    spec = PhaseSpec(0, "warmup", "sft", steps=warm.steps, lr=warm.lr, batch_size=warm.batch_size)
    ctx = PhaseContext(warm_cfg, policy, tokenizer, task=task, log=lambda *_: None)
    return SFTRunner.on_examples(ctx, spec, examples, weights, seed=0)


def _build(cfg, task, directory: Path, log) -> None:
    import torch

    from stagewise_pl.models.load import load_policy
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.phases.driver import fit_phase

    log(f"building the tiny base model in {directory.parent} (random init + {cfg.model.warmup.steps} warm-up steps)")
    save_random_tiny(directory, cfg.model.tiny, task, seed=0)
    if cfg.model.warmup.steps > 0:
        policy, tokenizer = load_policy(str(directory))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # a line every 10 s when the output is a file, a bar on a terminal (the build takes minutes)
            fit_phase(warmup_runner(cfg, task, policy, tokenizer), label="tiny base warm-up", every_s=10, log=log)
        policy.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    (directory / "stagewise_base.json").write_text(json.dumps({"key": base_key(cfg),
                                                              "warmup": dataclasses.asdict(cfg.model.warmup)}))
