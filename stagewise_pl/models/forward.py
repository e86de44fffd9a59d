"""The policy's forward pass as training uses it: decoder hidden states, and the SFT loss through the fused kernel.

The LM head is never applied to all positions: :func:`sft_loss` hands the hidden states and the head's weight
to :func:`stagewise_pl.kernels.fused_nll_loss`, so no ``[tokens x vocab]`` logits tensor is materialised.
The loss is the token-mean NLL over the supervised tokens of the batch (prompt and padding masked); with
gradient accumulation each micro-batch is averaged on its own, as in TRL's SFTTrainer.
"""
from __future__ import annotations

import torch

from stagewise_pl.data.sft import additive_mask
from stagewise_pl.kernels import fused_nll_loss, logprobs
from stagewise_pl.losses import IGNORE_INDEX, shift_labels


def hidden_states(policy: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, T, H) of the policy's decoder: the LM head is applied by the kernel."""
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 4 and mask.dtype == torch.bool and \
            getattr(policy.config, "_attn_implementation", "sdpa") != "sdpa":
        kwargs["attention_mask"] = additive_mask(mask, policy.dtype)  # packed rows, eager attention
    decoder = getattr(policy, policy.base_model_prefix)
    return decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state


def sft_loss(policy: torch.nn.Module, batch: dict[str, torch.Tensor], backend: str = "auto"):
    """Token-mean NLL of the completion tokens and their count, through the fused log-prob kernel. With
    ``loss_weights`` in the batch each token's NLL is weighted (still divided by the token count, so weights of
    1 give the plain loss)."""
    head = policy.get_output_embeddings()
    if "loss_weights" in batch:
        labels = shift_labels(batch["labels"])
        weights = torch.nn.functional.pad(batch["loss_weights"][:, 1:], (0, 1), value=0.0)
        logp, _ = logprobs(hidden_states(policy, batch), head.weight, labels, getattr(head, "bias", None),
                           backend=backend)
        count = (labels != IGNORE_INDEX).sum()
        return -(logp * weights.to(logp.dtype)).sum() / count.clamp(min=1), count
    return fused_nll_loss(hidden_states(policy, batch), head.weight, shift_labels(batch["labels"]),
                          getattr(head, "bias", None), backend=backend)
