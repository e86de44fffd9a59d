"""Rollout engines: ``generate(prompts, SamplingParams) -> RolloutBatch``; ``make_engine`` picks one from the config."""
from stagewise_pl.rollout.base import ENGINES, RolloutBatch, SamplingParams
from stagewise_pl.rollout import hf  # noqa: F401  (registers "hf")


def make_engine(rollout_cfg, model, tokenizer, model_path: str, dtype: str = "float32", batch_size: int = 64,
                progress: bool = False, rollout_dtype=None):
    """The configured engine. ``hf`` samples from ``model`` itself (in ``rollout_dtype``, a torch dtype; None: the
    model's own); ``vllm`` loads ``model_path`` (in ``rollout_dtype`` when given, else ``dtype``) and must be given
    the training weights with ``sync_weights`` before it samples for them."""
    if rollout_cfg.engine == "hf":
        return hf.HFEngine(model, tokenizer, batch_size=batch_size, progress=progress, dtype=rollout_dtype)
    from stagewise_pl.rollout.vllm_engine import VLLMEngine

    if rollout_dtype is not None:
        dtype = str(rollout_dtype).removeprefix("torch.")
    return VLLMEngine(model_path, dtype=dtype, max_model_len=rollout_cfg.max_model_len,
                      gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                      tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                      kv_cache_bytes=rollout_cfg.kv_cache_mb * 2**20, canary_tolerance=rollout_cfg.canary_tolerance)


__all__ = ["ENGINES", "RolloutBatch", "SamplingParams", "make_engine"]
