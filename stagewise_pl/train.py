"""Build SFT examples and run one SFT fit through a Lightning Trainer (warm-up and plan phases alike)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import lightning as L

from stagewise_pl.data.problems import Problem
from stagewise_pl.data.sft import Collator, Example, ResumableLoader, StepBatchSampler, ExampleDataset, encode_example
from stagewise_pl.models.load import render_prompt
from stagewise_pl.modules.sft import SFTModule


def sft_target(problem: Problem, target: str) -> str:
    """The completion to learn: the first teacher trace, or the dataset's reference solution."""
    if target == "teacher_trace":
        if not problem.teacher_traces:
            raise ValueError(f"problem {problem.id} has no teacher trace (data.target=teacher_trace)")
        return problem.teacher_traces[0]
    if not problem.solution:
        raise ValueError(f"problem {problem.id} has no reference solution (data.target=reference)")
    return problem.solution


def build_examples(tokenizer, problems: Sequence[Problem], target: str, max_length: int) -> list[Example]:
    return encode_pairs(tokenizer, [(p.prompt, sft_target(p, target)) for p in problems], max_length)


def encode_pairs(tokenizer, pairs: Sequence[tuple], max_length: int) -> list[Example]:
    """(user message, completion[, loss weight]) -> chat-rendered examples; warns about truncated ones."""
    examples = [encode_example(tokenizer, render_prompt(tokenizer, prompt), completion, max_length, *weight)
                for prompt, completion, *weight in pairs]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        warnings.warn(f"{truncated} of {len(examples)} SFT examples were longer than trainer.max_length="
                      f"{max_length} and were truncated")
    return examples


def make_trainer(trainer_cfg, run_cfg, max_steps: int, grad_clip: float, logger=None, callbacks=(),
                 default_root_dir: Optional[Path] = None, checkpointing: bool = True, max_epochs: int = -1,
                 accumulate: Optional[int] = None) -> L.Trainer:
    return L.Trainer(
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy, precision=trainer_cfg.precision, max_steps=max_steps, max_epochs=max_epochs,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches if accumulate is None else accumulate,
        gradient_clip_val=grad_clip or None,
        logger=logger if logger is not None else False, callbacks=list(callbacks),
        enable_checkpointing=checkpointing, enable_progress_bar=run_cfg.progress_bar, enable_model_summary=False,
        log_every_n_steps=trainer_cfg.log_every_n_steps, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, deterministic=run_cfg.deterministic or None,
        default_root_dir=str(default_root_dir) if default_root_dir else None,
    )


def fit_sft(trainer: L.Trainer, module: SFTModule, examples: Sequence[Example], pad_id: int, batch_size: int,
            max_length: int, packing: bool, seed: int, weights: Optional[Sequence[float]] = None,
            ckpt_path: Optional[str] = None) -> None:
    """Train ``module`` for ``trainer.max_steps`` optimizer steps on a seeded, resumable batch order."""
    accumulate = trainer.accumulate_grad_batches
    sampler = StepBatchSampler(len(examples), batch_size, trainer.max_steps * accumulate, seed, weights,
                               rank=trainer.global_rank, world_size=trainer.world_size)
    loader = ResumableLoader(ExampleDataset(examples), sampler, Collator(pad_id, max_length, packing),
                             consumed=lambda: trainer.global_step * accumulate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)


def sft_module(policy, optim_cfg, steps: int, lr: Optional[float] = None, kernel: str = "auto") -> SFTModule:
    return SFTModule(policy, lr=optim_cfg.lr if lr is None else lr, total_steps=steps,
                     weight_decay=optim_cfg.weight_decay, betas=tuple(optim_cfg.betas),
                     warmup_steps=min(optim_cfg.warmup_steps, max(0, steps // 5)),
                     min_lr_ratio=optim_cfg.min_lr_ratio, kernel_backend=kernel)


def fit_grpo(trainer: L.Trainer, module, max_rollout_steps: int, ckpt_path: Optional[str] = None) -> None:
    """Run ``module`` (a GRPOModule) until ``trainer.max_steps`` optimizer steps or ``max_rollout_steps``
    rollout steps; the prompt order is seeded and resumes where the checkpoint left it."""
    sampler = StepBatchSampler(len(module.problems), module.s.prompts_per_step, max_rollout_steps, module.seed,
                               rank=trainer.global_rank, world_size=trainer.world_size)
    # a batch is a list of problem indices: range(n) is the dataset whose items are their indices
    loader = ResumableLoader(range(len(module.problems)), sampler, list, consumed=lambda: module.rollout_steps)
    # One pass over the sampler is the whole budget. A Trainer given only max_steps loops over epochs until that
    # many optimizer steps: a policy whose groups are all flat (no update) would roll out forever.
    trainer.fit_loop.max_epochs = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # checkpoints are taken after a rollout step's updates, which is what resume needs
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
