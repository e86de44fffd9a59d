"""The tiny base model's warm-up: an SFT phase run on its own, before any plan.

:func:`tiny_base_model` returns the cached base of a configuration (:mod:`stagewise_pl.models.base`: its key and
cache), building it when missing: a random tiny Qwen2 (:mod:`stagewise_pl.models.tiny`), then ``model.warmup``
steps of SFT by :class:`~stagewise_pl.phases.supervised.SFTRunner` in its own Trainer -- the task's train split
(teacher traces, and a share of rewrite examples that teach reading a coarser reference), sampled by level weight.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from stagewise_pl.models.base import (cached_base, rewrite_examples, rewrite_template, warmup_weights,
                                      write_base_record)
from stagewise_pl.phases.context import PhaseContext
from stagewise_pl.phases.driver import fit_phase
from stagewise_pl.phases.supervised import SFTRunner
from stagewise_pl.plan import PhaseSpec


def tiny_base_model(cfg, task, log=print) -> Path:
    """Path of the cached tiny base model, building it (random init + warm-up SFT) when missing."""
    # warmed up on the plain levels: it never sees the skill
    return cached_base(cfg, lambda directory: build(cfg, task.plain(), directory, log))


def warmup_runner(cfg, task, policy, tokenizer):
    """The warm-up as an SFT phase run on its own: the task's train split (teacher traces, and a share of
    rewrite examples), sampled by level weight, ``model.warmup`` steps, batch size and learning rate, 50
    learning-rate warm-up steps, batch order seeded by 0."""
    from stagewise_pl.data.examples import build_examples
    from stagewise_pl.data.sft import encode_example
    from stagewise_pl.models.load import render_prompt

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


def build(cfg, task, directory: Path, log) -> None:
    import torch

    from stagewise_pl.models.load import load_policy
    from stagewise_pl.models.tiny import save_random_tiny

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
    write_base_record(cfg, directory)
