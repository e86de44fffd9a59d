"""Saving the policy as a Hugging Face checkpoint (``save_pretrained``), built aside and swapped into place."""
from __future__ import annotations

from pathlib import Path

from stagewise_pl.io import atomic_dir


def save_policy(policy, tokenizer, directory: Path) -> None:
    """``save_pretrained`` of policy (LoRA adapters merged, if any) and tokenizer into ``directory``."""
    from stagewise_pl.models.lora import merged_state_dict

    with atomic_dir(Path(directory)) as tmp:
        policy.save_pretrained(tmp, state_dict=merged_state_dict(policy))
        tokenizer.save_pretrained(tmp)
