"""Losses as pure tensor functions: tensors in, tensors out, no config reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from stagewise_pl.registry import Registry

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t+1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels`` (already shifted), 0 where ignored.  (B, T)"""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B*T,)
    return nll.view(labels.shape)


def masked_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT loss: mean NLL over the supervised tokens of the batch (token-mean), and their count.

    ``labels`` are aligned with the inputs (IGNORE_INDEX on prompt and padding); the shift is done here.
    """
    targets = shift_labels(labels)  # (B, T)
    count = (targets != IGNORE_INDEX).sum()
    nll = token_nll(logits, targets)  # (B, T)
    return nll.sum() / count.clamp(min=1), count


# ------------------------------------------------------------------------------------------ policy loss
@dataclass(frozen=True)
class PolicyLossConfig:
    """The clipped policy-gradient surrogate (PPO/GRPO family) and how per-token terms are aggregated.

    ``epsilon_high > epsilon_low`` is DAPO's clip-higher. ``beta`` weighs the k3 estimate of
    KL(policy || reference) (Schulman 2020); ``entropy_coef`` an entropy bonus on the token-mean
    entropy (the same normalisation under every aggregation).
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    aggregation: str = "token_mean"  # see AGGREGATIONS
    max_tokens: Optional[int] = None  # the constant normaliser of "constant" (default: the padded length)
    beta: float = 0.0
    entropy_coef: float = 0.0


AGGREGATIONS: Registry = Registry("loss aggregation")


@AGGREGATIONS.register("token_mean")
def token_mean_weights(mask: torch.Tensor, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Every completion token of the batch weighs the same (DAPO; TRL's 'bnpo' per batch)."""
    return mask / mask.sum().clamp(min=1)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean_weights(mask: torch.Tensor, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token-mean (the original GRPO)."""
    return mask / mask.sum(-1, keepdim=True).clamp(min=1) / mask.shape[0]


@AGGREGATIONS.register("constant")
def constant_weights(mask: torch.Tensor, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Sum over tokens divided by a constant, batch size x max tokens (Dr. GRPO): no length bias."""
    return mask / (mask.shape[0] * (max_tokens or mask.shape[-1]))


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float) -> torch.Tensor:
    """Per-token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old_logp)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(d) - d - 1 with d = ref_logp - logp."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_token_loss(logp, old_logp, advantages, cfg: PolicyLossConfig, ref_logp=None) -> torch.Tensor:
    """Per-token policy loss before aggregation: the clipped surrogate plus beta * k3 KL."""
    loss = clipped_surrogate(logp, old_logp, advantages, cfg.epsilon_low, cfg.epsilon_high)
    if cfg.beta:
        loss = loss + cfg.beta * k3_kl(logp, ref_logp)
    return loss


def aggregation_weights(mask: torch.Tensor, cfg: PolicyLossConfig) -> torch.Tensor:
    """(B, T) weights w such that the loss is sum(w * per-token loss)."""
    mask = mask if mask.is_floating_point() else mask.float()
    return AGGREGATIONS.get(cfg.aggregation)(mask, cfg.max_tokens)


def tis_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS): per token min(pi_train / pi_rollout, cap), detached -- the correction for
    tokens sampled by an engine whose probabilities differ from the training model's (another precision, another
    kernel), weighting each token's policy-gradient term; ``train_logp`` is the training model's log-prob of the
    token under the policy that sampled (the old policy)."""
    return torch.exp(train_logp.detach() - rollout_logp).clamp(max=cap)


def rollout_mismatch(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the rollout engine's log-probs of the sampled tokens are from the training model's, over the tokens
    of ``mask`` (B, T): ``kl``, the k3 estimate of KL(engine || training model) (exp(d) - d - 1, d = train - rollout:
    unbiased, as the tokens were drawn from the engine), ``max_gap`` the largest |d|, ``tokens`` how many."""
    m = mask.bool()
    d = (train_logp.detach().double() - rollout_logp.double())[m]
    if d.numel() == 0:
        return {"kl": 0.0, "max_gap": 0.0, "tokens": 0.0}
    return {"kl": float((torch.exp(d) - d - 1).mean()), "max_gap": float(d.abs().max()), "tokens": float(d.numel())}


def shaped_token_loss(logp: torch.Tensor, advantages: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token loss of an off-policy token under policy shaping (LUFFY, arXiv 2504.14945): -A f(pi) with
    f(pi) = pi / (pi + gamma), pi = exp(logp) the current policy's probability of the token. No ratio (the off-policy
    trace's own probabilities are taken as 1) and no clip; the gradient, A gamma pi / (pi + gamma)^2 times that of
    log pi, is largest for tokens the policy finds unlikely but not negligible."""
    p = torch.exp(logp)
    return -advantages * p / (p + gamma)


def shaped_policy_loss(logp, old_logp, advantages, mask, off_policy, cfg: PolicyLossConfig, gamma: float,
                       ref_logp=None, entropy=None) -> torch.Tensor:
    """The policy loss of a batch whose rows ``off_policy`` (B,) bool are a teacher's traces: those rows' tokens
    take :func:`shaped_token_loss`, the others the clipped surrogate; the aggregation (``cfg``) over every row's
    tokens, and the KL and entropy terms on every row. The reference for the fused kernel's shaped path."""
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    off = off_policy.bool().reshape(-1, 1).expand_as(logp)
    terms = torch.where(off, shaped_token_loss(logp, advantages, gamma),
                        clipped_surrogate(logp, old_logp, advantages, cfg.epsilon_low, cfg.epsilon_high))
    if cfg.beta:
        terms = terms + cfg.beta * k3_kl(logp, ref_logp)
    loss = (aggregation_weights(mask, cfg) * terms).sum()
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * (entropy_weights(mask) * entropy).sum()
    return loss


def policy_loss(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, ref_logp=None, entropy=None,
                rollout_logp=None, tis_cap: float = 0.0) -> torch.Tensor:
    """The policy loss from per-token log-probs (B, T); the reference for the fused kernel (``tis_cap``: see
    :func:`tis_weights`)."""
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    if tis_cap:
        advantages = advantages * tis_weights(old_logp, rollout_logp, tis_cap)
    weights = aggregation_weights(mask, cfg)
    loss = (weights * policy_token_loss(logp, old_logp, advantages, cfg, ref_logp)).sum()
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * (entropy_weights(mask) * entropy).sum()
    return loss


def entropy_weights(mask: torch.Tensor) -> torch.Tensor:
    """The entropy bonus is the token-mean entropy, whatever the policy term's aggregation (as in TRL):
    its strength then means the same thing under every aggregation."""
    mask = mask if mask.is_floating_point() else mask.float()
    return mask / mask.sum().clamp(min=1)


def clipped_fraction(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                     epsilon_high: float) -> torch.Tensor:
    """Share of completion tokens where the clip is active: ratio > 1 + eps_high with A > 0, or
    ratio < 1 - eps_low with A < 0 (there the token gets no gradient from the surrogate)."""
    active = ((ratio > 1 + epsilon_high) & (advantages > 0)) | ((ratio < 1 - epsilon_low) & (advantages < 0))
    mask = mask if mask.is_floating_point() else mask.float()
    return (active.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
