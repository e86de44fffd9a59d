"""Load any causal LM and its tokenizer by hub name or local path; render prompts with the chat template."""
from __future__ import annotations

from typing import Iterable

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


def render_prompt(tokenizer, prompt: str, system_prompt: str = "") -> str:
    """The prompt as the model sees it: the tokenizer's chat template with the generation prompt, after a system
    message when ``system_prompt`` is given ('' = none: the chat template's own default)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def render_prompts(tokenizer, prompts: Iterable[str], system_prompt: str = "") -> list[str]:
    return [render_prompt(tokenizer, p, system_prompt) for p in prompts]


class PromptRenderer:
    """How the run shows a problem to the model: the tokenizer's chat template and the run's system prompt
    (``model.system_prompt``). Every prompt a run renders -- profiles, rollouts, SFT examples, evaluation, Bridge and
    CFT inputs, the engine's canary -- goes through the one renderer of its :class:`PhaseContext`; an export writes
    the system prompt into the chat template (:func:`chat_template_with_system`), so the saved model is prompted as
    the run trained it. Rendered texts are kept by prompt (a GRPO phase renders its problems again each step)."""

    def __init__(self, tokenizer, system_prompt: str = ""):
        self.tokenizer, self.system_prompt = tokenizer, system_prompt or ""
        self._rendered: dict[str, str] = {}

    def __call__(self, prompt: str) -> str:
        text = self._rendered.get(prompt)
        if text is None:
            text = self._rendered[prompt] = render_prompt(self.tokenizer, prompt, self.system_prompt)
        return text

    def all(self, prompts: Iterable[str]) -> list[str]:
        return [self(p) for p in prompts]


def chat_template_with_system(template: str, system_prompt: str) -> str:
    """``template`` (Jinja, as transformers renders it) with ``system_prompt`` as the system message of every
    conversation that brings none of its own: what an export of a run with ``model.system_prompt`` carries."""
    if not system_prompt:
        return template
    quoted = system_prompt.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': '{quoted}'}}] + messages %}}"
            "{%- endif %}" + template)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
