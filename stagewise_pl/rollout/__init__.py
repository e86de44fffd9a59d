"""Rollout engines: ``generate(prompts, SamplingParams) -> RolloutBatch``."""
from stagewise_pl.rollout.base import ENGINES, RolloutBatch, SamplingParams
from stagewise_pl.rollout import hf  # noqa: F401  (registers "hf")

__all__ = ["ENGINES", "RolloutBatch", "SamplingParams"]
