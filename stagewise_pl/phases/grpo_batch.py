"""A GRPO rollout step's graded groups as a batch, its settings, and the parts of its update.

:class:`GRPOSettings` is everything a GRPO-family phase needs besides the model (from the ``grpo`` group).
:func:`batch_tensors` lays a step's :class:`~stagewise_pl.phases.sampling.Groups` out as a
:class:`~stagewise_pl.models.packed.CompletionBatch` (the forward over it: :mod:`stagewise_pl.models.packed`).
:func:`my_micro_slices` splits a mini-batch into this rank's micro-batches, :func:`rows_with_gradient` leaves out
rows whose gradient is exactly zero, :func:`old_logprobs` computes the old policy's log-probs when a batch makes
several optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from stagewise_pl import dist
from stagewise_pl.losses import PolicyLossConfig
from stagewise_pl.models.packed import CompletionBatch, ForwardSettings, completion_logprobs, micro_slices
from stagewise_pl.phases.sampling import Groups


@dataclass
class GRPOSettings:
    """Everything a GRPO phase needs besides the model: see ``GRPOConfig`` in the config for the meaning."""

    prompts_per_step: int = 16
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "grpo"
    std_scale: str = "default"
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    mask_truncated: bool = False
    num_iterations: int = 1
    minibatches: int = 1
    micro_batch_size: int = 0
    drop_flat_groups: bool = True
    dynamic_sampling: bool = False
    max_extra_rounds: int = 2
    shared_prefix: bool = True  # compute each distinct prompt once in the update's forward passes
    skip_zero_advantage_rows: bool = True
    tis_cap: float = 0.0  # truncated importance sampling on pi_train / pi_rollout; 0 = off

    @classmethod
    def from_config(cls, g, max_new_tokens: int) -> "GRPOSettings":
        loss = PolicyLossConfig(epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                                aggregation=g.loss_aggregation, max_tokens=max_new_tokens, beta=g.beta,
                                entropy_coef=g.entropy_coef)
        return cls(prompts_per_step=g.prompts_per_step, num_generations=g.num_generations,
                   max_new_tokens=max_new_tokens, temperature=g.temperature, top_p=g.top_p, advantage=g.advantage,
                   std_scale=g.std_scale, loss=loss, mask_truncated=g.mask_truncated,
                   num_iterations=g.num_iterations, minibatches=g.minibatches, micro_batch_size=g.micro_batch_size,
                   drop_flat_groups=g.drop_flat_groups, dynamic_sampling=g.dynamic_sampling,
                   max_extra_rounds=g.max_extra_rounds, skip_zero_advantage_rows=g.skip_zero_advantage_rows,
                   tis_cap=g.tis_cap)

    @property
    def updates_per_step(self) -> int:
        return self.num_iterations * self.minibatches


def batch_tensors(groups: Groups, advantages: torch.Tensor, pad_id: int, mask_truncated: bool,
                  device) -> CompletionBatch:
    """Left-padded prompts + right-padded completions as one (N, Lp + Lc) batch, with the completion mask
    (truncated completions masked out with ``mask_truncated``) and each row's advantage."""
    n = len(groups.completion_ids)
    lp = max(len(x) for x in groups.prompt_ids)
    lc = max(1, max(len(x) for x in groups.completion_ids))
    ids = torch.full((n, lp + lc), pad_id, dtype=torch.long)
    attn = torch.zeros((n, lp + lc), dtype=torch.long)
    g = groups.rewards.shape[1]
    for r, c in enumerate(groups.completion_ids):
        p = groups.prompt_ids[r // g]
        ids[r, lp - len(p):lp] = torch.tensor(p)
        attn[r, lp - len(p):lp] = 1
        if c:
            ids[r, lp:lp + len(c)] = torch.tensor(c)
            attn[r, lp:lp + len(c)] = 1
    mask = attn[:, lp:].clone().float()
    if mask_truncated:
        mask[torch.tensor(groups.truncated, dtype=torch.bool)] = 0.0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    rollout_logp = None
    if groups.logprobs is not None:
        rollout_logp = torch.zeros((n, lc), dtype=torch.float32)
        for r, values in enumerate(groups.logprobs):
            if values:
                rollout_logp[r, :len(values)] = torch.tensor(values, dtype=torch.float32)
        rollout_logp = rollout_logp.to(device)
    return CompletionBatch(
        input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=positions.to(device),
        targets=ids[:, lp:].to(device), mask=mask.to(device), prompt_len=lp,
        prompt_index=torch.arange(n, device=device) // g,
        prompt_lens=torch.tensor([len(groups.prompt_ids[r // g]) for r in range(n)], device=device),
        completion_lens=torch.tensor([len(c) for c in groups.completion_ids], device=device),
        advantages=advantages.reshape(-1).to(device), rollout_logp=rollout_logp)


def my_micro_slices(n: int, micro_batch_size: int) -> list[Optional[slice]]:
    """This rank's micro-batches of a mini-batch of ``n`` rows. Every rank gets the same number (None = a rank
    with nothing left makes an empty backward, so the gradient all-reduce stays in step). ``n = 0`` (every row
    skipped by :func:`rows_with_gradient`): one empty backward, so the optimizer step that follows still comes."""
    if n == 0:
        return [None]
    world = dist.world_size()
    if world == 1:
        return micro_slices(n, micro_batch_size)
    if micro_batch_size:
        parts = micro_slices(n, micro_batch_size)
    else:
        bounds = [round(i * n / world) for i in range(world + 1)]
        parts = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    mine: list[Optional[slice]] = list(parts[dist.rank()::world])
    return mine + [None] * (-(-len(parts) // world) - len(mine))


def rows_with_gradient(mb: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, ent_weights: torch.Tensor,
                       s: GRPOSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mini-batch ``mb`` (row indices) without the rows whose gradient is exactly zero, with their aggregation and
    entropy weights (computed over the whole mini-batch, so the normaliser is unchanged): rows whose advantage is 0
    everywhere (every row of a flat group when ``drop_flat_groups`` is off), when the loss has no KL and no entropy
    term. The clipped surrogate is 0 at A = 0 for any ratio, so the update is the same with or without them; their
    forward and backward are not paid for. ``s.skip_zero_advantage_rows`` off, or nothing to skip: unchanged."""
    keep = _gradient_positions(mb, advantages, s)
    return (mb, weights, ent_weights) if keep is None else (mb[keep], weights[keep], ent_weights[keep])


def _gradient_positions(mb: torch.Tensor, advantages: torch.Tensor, s: GRPOSettings) -> Optional[torch.Tensor]:
    """Positions in ``mb`` of the rows :func:`rows_with_gradient` keeps; None when it keeps them all."""
    if not s.skip_zero_advantage_rows or s.loss.beta or s.loss.entropy_coef:
        return None
    keep = advantages[mb].reshape(len(mb), -1).ne(0).any(1).nonzero()[:, 0]
    return None if len(keep) == len(mb) else keep


def old_logprobs(model, t: CompletionBatch, fwd: ForwardSettings, s: GRPOSettings) -> Optional[torch.Tensor]:
    """The old policy's log-probs of the batch ``t``, taken before the update's first optimizer step; None when the
    update makes one step per batch (``num_iterations`` and ``minibatches`` 1: the ratio's denominator is the
    current log-prob, detached). Only the rows that get a gradient in some mini-batch are computed (the others are
    0 and never read): with ``skip_zero_advantage_rows`` a flat group costs no forward here either."""
    if s.num_iterations == 1 and s.minibatches == 1:
        return None
    everyone = torch.arange(t.targets.shape[0], device=t.targets.device)
    keep = _gradient_positions(everyone, t.advantages, s)
    return completion_logprobs(model, t, fwd, rows=None if keep is None else everyone[keep])


