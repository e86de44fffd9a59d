"""Saving the policy as a Hugging Face checkpoint (``save_pretrained``), built aside and swapped into place."""
from __future__ import annotations

from pathlib import Path

from stagewise_pl.io import atomic_dir


def save_policy(policy, tokenizer, directory: Path, system_prompt: str = "") -> None:
    """``save_pretrained`` of policy (LoRA adapters merged, if any) and tokenizer into ``directory``. With the run's
    ``system_prompt`` the saved chat template puts it before a conversation that has no system message of its own,
    so the export answers prompts as the run trained it
    (:func:`~stagewise_pl.models.load.chat_template_with_system`)."""
    from stagewise_pl.models.load import chat_template_with_system
    from stagewise_pl.models.lora import merged_state_dict

    template = getattr(tokenizer, "chat_template", None)
    with atomic_dir(Path(directory)) as tmp:
        policy.save_pretrained(tmp, state_dict=merged_state_dict(policy))
        if system_prompt and template:
            tokenizer.chat_template = chat_template_with_system(template, system_prompt)
        try:
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.chat_template = template
