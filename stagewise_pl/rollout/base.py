"""The rollout contract shared by every engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from stagewise_pl.registry import Registry

ENGINES: Registry = Registry("rollout engine")


class EngineFailed(RuntimeError):
    """The rollout engine died or failed in a generation call (an engine with a life of its own: vLLM's engine core);
    the run stops at its last checkpoint and a resume starts a new engine."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = False


@dataclass
class RolloutBatch:
    """``n`` completions per prompt, prompt-major: sample j of prompt i is at ``i * n + j``."""

    n: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]  # "stop" (EOS or a stop string) or "length"
    logprobs: Optional[list[list[float]]] = None
    meta: dict = field(default_factory=dict)

    def samples_of(self, prompt_index: int) -> range:
        return range(prompt_index * self.n, (prompt_index + 1) * self.n)
