"""Supervised fine-tuning: next-token NLL on completion tokens only.

The loss is the token-mean over the supervised tokens of each micro-batch (prompt and padding
masked), computed from the decoder's hidden states by the fused log-prob kernel
(:func:`stagewise_pl.kernels.fused_nll_loss`): no [tokens x vocab] logits are materialised. With gradient accumulation Lightning averages micro-batch losses, so micro-batches with
fewer completion tokens weigh a little more than in a global token-mean; this matches TRL's
SFTTrainer. Optimiser: AdamW; schedule: linear warm-up then cosine decay to ``min_lr_ratio``.
"""
from __future__ import annotations

import math

import lightning as L
import torch

from stagewise_pl.data.sft import additive_mask
from stagewise_pl.kernels import fused_nll_loss, logprobs
from stagewise_pl.losses import IGNORE_INDEX, shift_labels


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear ramp, then cosine to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    """Token-mean NLL of the completion tokens and their count, through the fused log-prob kernel
    (no [tokens x vocab] logits are kept). With ``loss_weights`` in the batch each token's NLL is
    weighted (still divided by the token count, so weights of 1 give the plain loss)."""
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


class SFTModule(L.LightningModule):
    def __init__(self, policy: torch.nn.Module, lr: float, total_steps: int, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.98), warmup_steps: int = 20, min_lr_ratio: float = 0.1,
                 kernel_backend: str = "auto"):
        super().__init__()
        self.policy = policy
        self.lr, self.total_steps, self.weight_decay = lr, total_steps, weight_decay
        self.betas, self.warmup_steps, self.min_lr_ratio = tuple(betas), warmup_steps, min_lr_ratio
        self.kernel_backend = kernel_backend
        self.log_prefix = ""  # the phase name, so metrics of several phases share one logger

    def on_fit_start(self) -> None:
        self.policy.train()  # from_pretrained returns the model in eval mode

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_states(self.policy, batch)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return sft_loss(self.policy, batch, self.kernel_backend)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, tokens = self.loss(batch)
        rows = batch["input_ids"].shape[0]
        self.log(f"{self.log_prefix}train/loss", loss, prog_bar=True, batch_size=rows)
        self.log(f"{self.log_prefix}train/tokens", tokens.float(), reduce_fx="sum", batch_size=rows)
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy, self.lr, self.betas, self.weight_decay, self.warmup_steps,
                                   self.total_steps, self.min_lr_ratio)


def adamw_with_schedule(policy: torch.nn.Module, lr: float, betas, weight_decay: float, warmup_steps: int,
                        total_steps: int, min_lr_ratio: float) -> dict:
    """AdamW (no decay on norms and biases; torch's fused kernel where it exists: CPU and CUDA floating
    tensors) with :func:`cosine_with_warmup` stepped per optimizer step, as Lightning wants it."""
    decay = [p for p in policy.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in policy.parameters() if p.requires_grad and p.ndim < 2]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in policy.parameters())
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas), fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(
        s, warmup_steps, total_steps, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
