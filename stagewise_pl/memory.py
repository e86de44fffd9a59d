"""A per-GPU memory estimate for ``--dry-run``: parameters from the model's shape, no weights loaded.

The shape comes from the tiny model's config, a local directory's ``config.json``, or :data:`KNOWN`
(the public ``config.json`` figures of the models the recipes name, so that a hub name needs no
download). The estimate is arithmetic, not a measurement: weights, gradients and AdamW's two moments
in the parameter dtype (every DDP rank holds them all; with LoRA gradients and moments of the adapters
only), a frozen KL reference when ``grpo.beta > 0``, activations of one micro-batch (rows x
``trainer.max_length`` tokens; one hidden state per layer with gradient checkpointing, about
``18 H + 4 I`` values per token and layer without), the fused log-prob kernel's chunk instead of full
logits, and the share of the GPU a colocated vLLM engine reserves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    def lora_parameters(self, rank: int, targets) -> int:
        """Adapter parameters: rank x (in + out) for every targeted projection of every layer."""
        h, kv, i = self.hidden, self.kv_heads * (self.hidden // self.heads), self.intermediate
        sizes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                 "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(rank * (a + b) for name, (a, b) in sizes.items() if name in set(targets))

    def parameters(self) -> int:
        """Decoder-only transformer with grouped-query attention and a gated MLP (Qwen2, Llama)."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        per_layer = attention + 3 * h * self.intermediate + 2 * h
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + self.layers * per_layer + h + head


# public config.json figures (hidden, layers, heads, kv heads, intermediate, vocab, tied, q/k/v bias)
KNOWN = {
    "Qwen/Qwen2.5-0.5B-Instruct": Shape(896, 24, 14, 2, 4864, 151936, True, True),
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(1536, 28, 12, 2, 8960, 151936, True, True),
    "Qwen/Qwen2.5-Math-1.5B": Shape(1536, 28, 12, 2, 8960, 151936, True, True),
    "Qwen/Qwen2.5-3B-Instruct": Shape(2048, 36, 16, 2, 11008, 151936, True, True),
    "meta-llama/Llama-3.2-1B-Instruct": Shape(2048, 16, 32, 8, 8192, 128256, True, False),
    "smollm2-135m": Shape(576, 30, 9, 3, 1536, 49152, True, False),  # stagewise_pl/models/packaged.py
}


def shape_from_config(config: dict) -> Shape:
    kind = config.get("model_type", "")
    return Shape(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                 config.get("num_key_value_heads", config["num_attention_heads"]), config["intermediate_size"],
                 config["vocab_size"], bool(config.get("tie_word_embeddings", False)),
                 kind == "qwen2" or bool(config.get("attention_bias", False)))


def model_shape(cfg) -> Optional[Shape]:
    """The policy's shape without loading weights; None when it cannot be known offline."""
    name = cfg.model.name_or_path
    if name == "tiny":
        t = cfg.model.tiny
        return Shape(t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size,
                     True, True)
    local = Path(name).expanduser() / "config.json"
    if local.is_file():
        return shape_from_config(json.loads(local.read_text()))
    return KNOWN.get(name)


def estimate(cfg, gpu_gib: float = 80.0) -> Optional[dict]:
    """GiB per GPU by part, for the largest training micro-batch the plan runs; None if the shape is unknown."""
    shape = model_shape(cfg)
    if shape is None:
        return None
    params, width = shape.parameters(), BYTES[cfg.model.dtype]
    grpo_rows = cfg.grpo.micro_batch_size or cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    tokens = max(cfg.trainer.batch_size, grpo_rows) * cfg.trainer.max_length  # rows x the longest sequence
    per_token = shape.hidden if cfg.model.gradient_checkpointing else 18 * shape.hidden + 4 * shape.intermediate
    m = cfg.model
    trained = shape.lora_parameters(m.lora_rank, m.lora_targets) if m.lora_rank else params  # LoRA: adapters only
    parts = {
        "weights": (params + (trained if m.lora_rank else 0)) * width,
        "gradients": trained * width,
        "AdamW moments": 2 * trained * width,
        "KL reference": params * width if cfg.grpo.beta > 0 else 0,
        "activations": tokens * shape.layers * per_token * width
                       + (tokens * shape.hidden * width * 8 if cfg.model.gradient_checkpointing else 0),
        "log-prob chunk": 4096 * shape.vocab * 4,
        "vLLM reservation": cfg.rollout.gpu_memory_utilization * gpu_gib * GIB if cfg.rollout.engine == "vllm" else 0,
    }
    out = {k: round(v / GIB, 2) for k, v in parts.items()}
    out.update(parameters=params, total=round(sum(parts.values()) / GIB, 1), tokens_per_micro_batch=tokens)
    return out


def describe(cfg, gpu_gib: float = 80.0) -> list[str]:
    est = estimate(cfg, gpu_gib)
    if est is None:
        return [f"memory estimate: the shape of {cfg.model.name_or_path!r} is not known offline "
                f"(give a local directory with its config.json)"]
    parts = ", ".join(f"{k} {est[k]}" for k in ("weights", "gradients", "AdamW moments", "KL reference",
                                               "activations", "log-prob chunk", "vLLM reservation") if est[k])
    fits = "fits" if est["total"] <= gpu_gib else "does NOT fit"
    n = est["parameters"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return [f"memory estimate per GPU (arithmetic, not measured): {size} parameters "
            f"in {cfg.model.dtype}; {est['tokens_per_micro_batch']} tokens per micro-batch",
            f"  GiB: {parts}; total {est['total']} — {fits} in {gpu_gib:g} GiB"]
