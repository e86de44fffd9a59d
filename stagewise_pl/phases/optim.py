"""The optimiser of every training phase, its schedule, and the guarded optimizer step they share.

AdamW (no decay on norms and biases; torch's fused kernel on CPU and CUDA floating tensors) with a linear
warm-up of ``min(optim.warmup_steps, steps // 5)`` steps, then cosine decay to ``optim.min_lr_ratio`` of the
peak, stepped per optimizer step. :func:`guarded_step` asks the non-finite guard first: a NaN/inf loss or
gradient drops the gradients and moves the schedule on without touching parameters or moments.
"""
from __future__ import annotations

import math

import torch

from stagewise_pl.nonfinite import grad_norm


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear ramp, then cosine to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(optim_cfg, steps: int) -> int:
    """The warm-up of a phase of ``steps`` optimizer steps: ``optim.warmup_steps``, at most a fifth of them."""
    return min(optim_cfg.warmup_steps, max(0, steps // 5))


def adamw_with_schedule(policy: torch.nn.Module, lr: float, betas, weight_decay: float, warmup_steps: int,
                        total_steps: int, min_lr_ratio: float) -> dict:
    """AdamW with :func:`cosine_with_warmup` stepped per optimizer step, as Lightning wants it."""
    decay = [p for p in policy.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in policy.parameters() if p.requires_grad and p.ndim < 2]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in policy.parameters())
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas), fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(
        s, warmup_steps, total_steps, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def phase_optimizer(policy: torch.nn.Module, optim_cfg, lr: float, steps: int) -> dict:
    """The optimiser and schedule of a phase of ``steps`` optimizer steps at peak ``lr``."""
    return adamw_with_schedule(policy, lr, optim_cfg.betas, optim_cfg.weight_decay,
                               warmup_steps_for(optim_cfg, steps), steps, optim_cfg.min_lr_ratio)


def guarded_step(module, guard, loss: float, step: int, grad_clip: float) -> bool:
    """One optimizer step of ``module``'s optimiser after the gradients of ``loss`` accumulated, unless the guard
    finds the loss or a gradient non-finite (then the gradients are dropped). The schedule moves on either way.
    The gradients' total norm is computed once: the guard reads it, and clipping to ``grad_clip`` (0 = off)
    scales by it (Lightning's ``clip_gradients`` would compute it again; with the DDP strategies and the
    precisions the trainer accepts it does nothing else). Returns whether the parameters were updated."""
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    params = [p for p in module.policy.parameters() if p.grad is not None]
    norm = grad_norm(params)
    if not guard.ok(loss, norm, step):
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return False
    if grad_clip and norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm.float())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return True
