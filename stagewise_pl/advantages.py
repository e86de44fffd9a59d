"""Group-relative advantage estimators as pure tensor functions: rewards (P, G) in, advantages (P, G) out.

Each prompt has G sampled completions (a group). An estimator subtracts a baseline computed from
the group; ``std_scale`` then divides by a standard deviation:

- ``grpo``: baseline = group mean (Shao et al. 2024); default scale: per group.
- ``dr_grpo``: baseline = group mean, no scaling (Liu et al. 2025, "Dr. GRPO": the std division
  up-weights groups that are nearly all right or all wrong).
- ``rloo``: baseline = mean of the *other* G-1 samples (Ahmadian et al. 2024), i.e.
  G/(G-1) x (r - group mean); default scale: none.

``std_scale``: ``group`` (each group's own std), ``batch`` (one std over every reward of the
batch), ``none``, or ``default`` (the estimator's own choice above). Stds are the unbiased sample
std, as in TRL; ``eps`` keeps a zero-variance group at advantage 0 instead of 0/0.
"""
from __future__ import annotations

import torch

from stagewise_pl.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")
STD_SCALES = ("default", "group", "batch", "none")
DEFAULT_SCALE = {"grpo": "group", "dr_grpo": "none", "rloo": "none"}


@ADVANTAGES.register("grpo")
def grpo_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean of the group."""
    return rewards - rewards.mean(-1, keepdim=True)


@ADVANTAGES.register("dr_grpo")
def dr_grpo_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean of the group (the scaling is what differs from grpo: none by default)."""
    return rewards - rewards.mean(-1, keepdim=True)


@ADVANTAGES.register("rloo")
def rloo_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean of the other samples of the group (leave-one-out)."""
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError("rloo needs at least 2 samples per group")
    return (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (g - 1))


def compute_advantages(rewards: torch.Tensor, estimator: str = "grpo", std_scale: str = "default",
                       eps: float = 1e-4) -> torch.Tensor:
    """Advantages (P, G) of rewards (P, G) by a registered ``estimator`` and a ``std_scale``."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, samples per prompt), got shape {tuple(rewards.shape)}")
    if std_scale not in STD_SCALES:
        raise ValueError(f"unknown std_scale {std_scale!r}; one of {STD_SCALES}")
    advantages = ADVANTAGES.get(estimator)(rewards)
    scale = DEFAULT_SCALE.get(estimator, "none") if std_scale == "default" else std_scale
    if scale == "group":
        std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(rewards[:, :1])
        advantages = advantages / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        advantages = advantages / (std + eps)
    return advantages


def group_stats(rewards: torch.Tensor) -> dict[str, float]:
    """Fractions of groups whose rewards are all zero, all one (at the maximum), or all equal."""
    lo, hi = rewards.min(-1).values, rewards.max(-1).values
    same = lo == hi
    return {"zero_groups": float((same & (hi <= 0)).float().mean()),
            "one_groups": float((same & (lo >= 1)).float().mean()),
            "flat_groups": float(same.float().mean())}
