"""Rollout engines: ``generate(prompts, SamplingParams) -> RolloutBatch``; ``make_engine`` picks one from the config."""
from stagewise_pl.rollout.base import ENGINES, RolloutBatch, SamplingParams
from stagewise_pl.rollout import hf  # noqa: F401  (registers "hf")


def make_engine(rollout_cfg, model, tokenizer, model_path: str, dtype: str = "float32", batch_size: int = 64,
                progress: bool = False):
    """The configured engine. ``hf`` samples from ``model`` itself; ``vllm`` loads ``model_path`` and
    must be given the training weights with ``sync_weights`` before it samples for them."""
    if rollout_cfg.engine == "hf":
        return hf.HFEngine(model, tokenizer, batch_size=batch_size, progress=progress)
    from stagewise_pl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, dtype=dtype, max_model_len=rollout_cfg.max_model_len,
                      gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                      tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                      kv_cache_bytes=rollout_cfg.kv_cache_mb * 2**20, canary_tolerance=rollout_cfg.canary_tolerance)


__all__ = ["ENGINES", "RolloutBatch", "SamplingParams", "make_engine"]
