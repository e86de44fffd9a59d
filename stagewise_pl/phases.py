"""Phase kinds of the plan, registered by name. A phase trains the shared in-memory policy.

A phase runner is ``run(ctx, phase_cfg, ckpt_path) -> summary dict``; ``ckpt_path`` is the Lightning
checkpoint to resume the phase from, or None. New kinds register here (or by dotted path) without
changing the runner.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from stagewise_pl.registry import Registry

PhaseRunner = Callable[[Any, Any, Optional[str]], dict]
PHASES: Registry[PhaseRunner] = Registry("phase kind")


def save_final_checkpoint(trainer, directory) -> None:
    """last.ckpt is the phase's end state, whether or not the last step fell on the checkpoint interval."""
    trainer.save_checkpoint(str(directory / "last.ckpt"))


@PHASES.register("sft")
def run_sft_phase(ctx, phase, ckpt_path: Optional[str]) -> dict:
    """SFT on the training pool with ``data.target`` (teacher traces or reference solutions)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stagewise_pl.train import build_examples, fit_sft, make_trainer, sft_module

    cfg = ctx.cfg
    examples = build_examples(ctx.tokenizer, ctx.pool, cfg.data.target, cfg.trainer.max_length)
    checkpoint = ModelCheckpoint(dirpath=ctx.checkpoint_dir(phase), filename="step-{step}",
                                 every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_top_k=-1,
                                 save_last=True, auto_insert_metric_name=False)
    trainer = make_trainer(cfg.trainer, cfg.run, phase.steps, cfg.optim.grad_clip, logger=ctx.logger,
                           callbacks=[checkpoint, *ctx.callbacks])
    module = sft_module(ctx.policy, cfg.optim, phase.steps, lr=phase.lr, kernel=cfg.trainer.kernel)
    module.log_prefix = f"{phase.name}/"
    started = time.time()
    fit_sft(trainer, module, examples, ctx.tokenizer.pad_token_id, phase.batch_size or cfg.trainer.batch_size,
            cfg.trainer.max_length, cfg.trainer.packing, seed=cfg.run.seed + phase.index, ckpt_path=ckpt_path)
    save_final_checkpoint(trainer, ctx.checkpoint_dir(phase))
    loss = trainer.callback_metrics.get(f"{phase.name}/train/loss")
    return {"kind": "sft", "steps": trainer.global_step, "examples": len(examples),
            "final_loss": None if loss is None else float(loss), "seconds": round(time.time() - started, 1),
            "target": cfg.data.target}


def pool_at_levels(ctx, levels, key: str) -> list:
    """The gradable pool problems at ``levels`` ([] = all); ``key`` names the setting in errors."""
    from stagewise_pl.config import ConfigError
    from stagewise_pl.verify.gold import gradable

    levels = [str(level) for level in levels]
    problems = [p for p in gradable(ctx.pool) if not levels or str(p.level) in levels]
    if not problems:
        raise ConfigError(f"{key}={levels}: no gradable problem of the training pool is at these levels")
    return problems


def generation_budget(ctx, override: int) -> int:
    """New tokens per completion: ``override``, else the task's budget (synthetic), else the eval budget."""
    cfg = ctx.cfg
    return override or (ctx.task.max_new_tokens() if cfg.data.source == "synthetic" else cfg.eval.max_new_tokens or 512)


@PHASES.register("grpo")
def run_grpo_phase(ctx, phase, ckpt_path: Optional[str]) -> dict:
    """GRPO on the RL set (see :mod:`stagewise_pl.modules.grpo`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stagewise_pl.advantages import ADVANTAGES
    from stagewise_pl.config import ConfigError
    from stagewise_pl.modules.grpo import GRPOModule, GRPOSettings
    from stagewise_pl.records import NullSink, ZeroRewardLog
    from stagewise_pl.train import fit_grpo, make_trainer

    cfg, g = ctx.cfg, ctx.cfg.grpo
    try:
        ADVANTAGES.get(g.advantage)
    except (KeyError, ImportError) as exc:
        raise ConfigError(f"grpo.advantage: {exc.args[0] if exc.args else exc}") from None
    settings = GRPOSettings.from_config(g, generation_budget(ctx, g.max_new_tokens))
    if phase.batch_size:
        settings.prompts_per_step = phase.batch_size
    problems = pool_at_levels(ctx, g.levels, "grpo.levels")  # the stage manager will choose the RL set
    sink = getattr(ctx, "ledger", None)  # the difficulty ledger when the run has one (an empty one is falsy)
    if sink is None:
        sink = ZeroRewardLog(ctx.dir / "zero_reward.jsonl") if g.zero_reward_log else NullSink()
    per_step = settings.updates_per_step
    checkpoint = ModelCheckpoint(dirpath=ctx.checkpoint_dir(phase), filename="step-{step}",
                                 every_n_train_steps=cfg.trainer.checkpoint_every_n_steps * per_step, save_top_k=-1,
                                 save_last=True, auto_insert_metric_name=False)
    trainer = make_trainer(cfg.trainer, cfg.run, phase.steps * per_step, 0.0, logger=ctx.logger,
                           callbacks=[checkpoint, *ctx.callbacks], max_epochs=1, accumulate=1)
    lr = cfg.optim.lr if phase.lr is None else phase.lr
    module = GRPOModule(ctx.policy, ctx.tokenizer, ctx.engine(), ctx.verifier, problems, settings, lr=lr,
                        total_steps=phase.steps, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
                        warmup_steps=min(cfg.optim.warmup_steps, phase.steps // 5), min_lr_ratio=cfg.optim.min_lr_ratio,
                        grad_clip=cfg.optim.grad_clip, seed=cfg.run.seed + 1000 * phase.index, sink=sink,
                        phase_name=phase.name, kernel_backend=cfg.trainer.kernel, phase_index=phase.index)
    started = time.time()
    fit_grpo(trainer, module, max_rollout_steps=phase.steps * g.max_rollout_factor, ckpt_path=ckpt_path)
    save_final_checkpoint(trainer, ctx.checkpoint_dir(phase))
    h = module.history
    tenth = max(1, len(h) // 10)

    def mean(key, rows):
        return round(sum(r[key] for r in rows) / len(rows), 4) if rows else None

    if module.update_steps < phase.steps:
        ctx.log(f"phase {phase.name}: only {module.update_steps} of {phase.steps} rollout steps had a group with "
                f"signal within {phase.steps * g.max_rollout_factor} rollout steps (grpo.max_rollout_factor)")
    return {"kind": "grpo", "steps": module.update_steps, "optimizer_steps": trainer.global_step,
            "rollout_steps": module.rollout_steps, "problems": len(problems),
            "reward_first_tenth": mean("reward", h[:tenth]), "reward_last_tenth": mean("reward", h[-tenth:]),
            "zero_groups": mean("zero_groups", h), "one_groups": mean("one_groups", h),
            "seconds": round(time.time() - started, 1),
            "seconds_generation": round(sum(r["s_generation"] for r in h), 1),
            "seconds_grading": round(sum(r["s_grading"] for r in h), 1),
            "seconds_training": round(sum(r["s_training"] for r in h), 1)}


def run_ledger(ctx):
    """The run's difficulty ledger, opened on first use under <run>/ledger (kept on ``ctx.ledger``)."""
    if getattr(ctx, "ledger", None) is None:
        from stagewise_pl.ledger import DifficultyLedger

        ctx.ledger = DifficultyLedger(ctx.dir / "ledger", run_id=ctx.dir.name)
    return ctx.ledger


@PHASES.register("profile")
def run_profile_phase(ctx, phase, ckpt_path: Optional[str]) -> dict:
    """k samples per problem under the current policy, graded and recorded in the ledger; no training.

    Each chunk of problems is one generation call and one ledger part. A profile cut short by a crash
    is redone from its start on resume (its partial records are dropped first): sampling is seeded
    per chunk, so the redone profile equals an uninterrupted one.
    """
    import numpy as np

    from stagewise_pl.eval.evaluate import BUCKETS
    from stagewise_pl.models.load import render_prompts
    from stagewise_pl.records import RolloutRecord
    from stagewise_pl.rollout.base import SamplingParams

    cfg, pc = ctx.cfg, ctx.cfg.profile
    problems = pool_at_levels(ctx, pc.levels, "profile.levels")
    if pc.limit and pc.limit < len(problems):
        keep = np.random.default_rng([cfg.run.seed, phase.index]).choice(len(problems), pc.limit, replace=False)
        problems = [problems[i] for i in sorted(keep)]
    budget = generation_budget(ctx, pc.max_new_tokens)
    ledger = run_ledger(ctx)
    ledger.rewind(phase.name, 0)
    engine = ctx.engine()
    started, rates = time.time(), {}
    for c, start in enumerate(range(0, len(problems), pc.chunk)):
        chunk = problems[start:start + pc.chunk]
        sampling = SamplingParams(n=pc.k, temperature=pc.temperature, max_new_tokens=budget,
                                  seed=int(np.random.default_rng([cfg.run.seed, phase.index, c]).integers(2**31 - 1)))
        batch = engine.generate(render_prompts(ctx.tokenizer, [p.prompt for p in chunk]), sampling,
                                desc=f"profile {start + len(chunk)}/{len(problems)}")
        verdicts = ctx.verifier.score_batch(batch.texts, [p.answer for p in chunk for _ in range(pc.k)])
        records = []
        for i, problem in enumerate(chunk):
            rows = range(i * pc.k, (i + 1) * pc.k)
            zero = all(verdicts[r].reward <= 0 for r in rows)
            rates[problem.id] = sum(verdicts[r].reason == "correct" for r in rows) / pc.k
            for j, r in enumerate(rows):
                reward = float(verdicts[r].reward)
                records.append(RolloutRecord(phase.name, "profile", c, problem.id, j, reward, verdicts[r].reason,
                                             len(batch.completion_ids[r]), batch.finish_reasons[r] == "length", zero,
                                             batch.texts[r] if reward <= 0 else None, 0, phase.index, 0))
        ledger.record(records)
    buckets = {name: sum(1 for p in rates.values() if rule(p)) for name, rule in BUCKETS.items()}
    ctx.log(f"phase {phase.name}: {len(problems)} problems x {pc.k} samples; easy (p=1) {buckets['easy']}, "
            f"medium {buckets['medium']}, hard (p=0) {buckets['hard']}")
    return {"kind": "profile", "steps": 0, "problems": len(problems), "k": pc.k, **buckets,
            "mean_pass_rate": round(sum(rates.values()) / len(rates), 4), "seconds": round(time.time() - started, 1)}
