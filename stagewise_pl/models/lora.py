"""LoRA through peft, injected into the policy in place (``model.lora_rank > 0``).

The policy stays the same Hugging Face module (no wrapper), so every phase trains it unchanged: only the
adapter matrices require gradients, so the optimisers hold only them. Wherever weights leave the
process -- an export, a checkpoint digest, a vLLM weight push -- :func:`merged_state_dict` gives the
plain model's state dict with each adapted weight merged (``W + scale * B @ A``), so an export loads with
``from_pretrained`` and vLLM serves the adapted model.
"""
from __future__ import annotations

import torch

LORA_HINT = "pip install 'stagewise_pl[lora]' (peft)"


def apply_lora(policy: torch.nn.Module, rank: int, alpha: float, dropout: float, targets) -> int:
    """Inject LoRA adapters into ``targets`` (module name suffixes) and freeze everything else; returns the
    number of trainable parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ImportError(f"model.lora_rank > 0 needs peft: {LORA_HINT}") from exc
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=list(targets),
                        bias="none")
    inject_adapter_in_model(config, policy)
    trainable = 0
    for name, param in policy.named_parameters():
        param.requires_grad_("lora_" in name)
        trainable += param.numel() if param.requires_grad else 0
    if not trainable:
        raise ValueError(f"model.lora_targets {list(targets)} matched no module of the policy")
    return trainable


def has_lora(policy: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in policy.named_parameters())


@torch.no_grad()
def merged_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict: adapters merged into their base weights, adapter tensors left out.
    Without adapters, the policy's own state dict."""
    state = policy.state_dict()
    if not has_lora(policy):
        return state
    out = {name: tensor for name, tensor in state.items() if "lora_" not in name and ".base_layer." not in name}
    for module_name, module in policy.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            base = module.base_layer
            weight = base.weight.detach().clone()
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).to(weight.dtype)
            out[f"{module_name}.weight"] = weight
            if getattr(base, "bias", None) is not None:
                out[f"{module_name}.bias"] = base.bias.detach().clone()
    return out
