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
    loss = trainer.callback_metrics.get(f"{phase.name}/train/loss")
    return {"kind": "sft", "steps": trainer.global_step, "examples": len(examples),
            "final_loss": None if loss is None else float(loss), "seconds": round(time.time() - started, 1),
            "target": cfg.data.target}
