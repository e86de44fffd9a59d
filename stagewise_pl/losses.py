"""Losses as pure tensor functions: tensors in, tensors out, no config reads."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t+1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels`` (already shifted), 0 where ignored.  (B, T)"""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
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
