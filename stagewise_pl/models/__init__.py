"""Policy models: loading by hub name or path, and the built-in tiny model."""
from stagewise_pl.models.load import load_policy, render_prompt, render_prompts

__all__ = ["load_policy", "render_prompt", "render_prompts"]
