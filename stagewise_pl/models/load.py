"""Load any causal LM and its tokenizer by hub name or local path; render prompts with the chat template."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(name_or_path: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                hub_kernels: bool = False):
    """``(model, tokenizer)`` through ``from_pretrained``: the same path for the tiny model and a hub model.

    flash_attention_2 falls back to sdpa with a warning when flash-attn is not installed. ``hub_kernels``
    (``model.hub_kernels``) is transformers' ``use_kernels``: off unless asked, as nothing may download at run time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            import warnings

            warnings.warn("flash-attn is not installed (pip install 'stagewise_pl[gpu]'); using sdpa")
            attn_implementation = "sdpa"
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                 attn_implementation=attn_implementation, use_kernels=hub_kernels)
    return model, tokenizer


SYSTEM_ATTRIBUTE = "stagewise_system_prompt"


def set_system_prompt(tokenizer, text: str) -> None:
    """The run's system prompt (``model.system_prompt``; '' = none: the chat template's own default): kept on
    the tokenizer, so every prompt the run renders -- profile, SFT examples, rollouts,
    evaluation, Bridge and CFT inputs -- gets it through :func:`render_prompt`."""
    setattr(tokenizer, SYSTEM_ATTRIBUTE, text or None)


def render_prompt(tokenizer, prompt: str, system_prompt: Optional[str] = None) -> str:
    """The prompt as the model sees it: the tokenizer's chat template with the generation prompt, and the
    system prompt given here or set on the tokenizer by :func:`set_system_prompt`."""
    if system_prompt is None:
        system_prompt = getattr(tokenizer, SYSTEM_ATTRIBUTE, None)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def render_prompts(tokenizer, prompts: Iterable[str], system_prompt: Optional[str] = None) -> list[str]:
    return [render_prompt(tokenizer, p, system_prompt) for p in prompts]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
