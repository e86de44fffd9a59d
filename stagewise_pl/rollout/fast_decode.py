"""A lean single-token decode step for Llama-family decoders (Qwen2, Llama), used by HFEngine.

Why: with a small model, one decoding step of ``model(...)`` costs mostly Python and per-op
overhead (mask construction, cache bookkeeping with ``torch.cat``, module dispatch), not
arithmetic. This step does the same arithmetic with fewer ops, on the model's own parameters:
- one matmul for q, k and v and one for gate and up (weights concatenated once per ``generate``
  call, so they are the current training weights);
- a preallocated key/value cache written in place (no ``torch.cat`` per step), rows dropped
  with ``index_select`` when they finish;
- cos/sin for every position computed once per batch by the model's own rotary module (so static
  rope variants behave as in transformers), applied to queries and keys in one go with the
  modelling file's ``rotate_half``; RMSNorm as one ``F.rms_norm``; ``scaled_dot_product_attention``
  with grouped heads; weights and biases gathered once per batch (no module lookups per token).
The prompt is still prefilled by ``model(...)``; its cache is copied into the preallocated one.
Anything this step does not cover (other architectures, sliding windows, q/k norms) makes
:func:`supports` return False and HFEngine keeps the transformers path. The tests check that
both paths give the same tokens and log-probs.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")
_NATIVE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def supports(model) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE:  # dynamic rope depends on length
        return False
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(decoder, "layers", None)
    if not layers or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "norm"):
        return False
    attn = layers[0].self_attn
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")) and \
        not hasattr(attn, "q_norm") and all(hasattr(layers[0].mlp, a) for a in ("gate_proj", "up_proj", "down_proj"))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama/Qwen2 modules compute it (in float32, weight applied after)."""
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _cat_bias(*linears):
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                           device=lin.weight.device)
                      for b, lin in zip(biases, linears)])


class FastDecoder:
    """Decoding state for one batch: call :meth:`load_prefill`, then :meth:`step` per token."""

    def __init__(self, model, rows: int, max_len: int):
        self.model = model
        self.decoder = getattr(model, model.base_model_prefix)
        self.rotate_half = getattr(sys.modules[type(self.decoder.layers[0].self_attn).__module__], "rotate_half",
                                   _rotate_half)
        attn = self.decoder.layers[0].self_attn
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.gqa = self.n_heads != self.n_kv
        # per layer, everything the step reads (attribute lookups on modules cost microseconds each)
        self.plan = []
        for layer in self.decoder.layers:
            a, m = layer.self_attn, layer.mlp
            self.plan.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), _cat_bias(a.q_proj, a.k_proj, a.v_proj),
                a.o_proj.weight, a.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]), _cat_bias(m.gate_proj, m.up_proj),
                m.down_proj.weight, m.down_proj.bias))
        head = model.get_output_embeddings()
        self.embed = self.decoder.embed_tokens.weight
        self.final = (self.decoder.norm.weight, self.decoder.norm.variance_epsilon, head.weight,
                      getattr(head, "bias", None))
        p = next(model.parameters())
        shape = (rows, self.n_kv, max_len, self.head_dim)
        self.keys = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.decoder.layers]
        self.values = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.decoder.layers]
        self.valid = torch.zeros((rows, max_len), dtype=torch.bool, device=p.device)
        self.length = 0
        # cos/sin of every position, from the model's own rotary module (static rope types only: see supports)
        probe = torch.zeros((1, 1, 1), dtype=p.dtype, device=p.device)
        cos, sin = self.decoder.rotary_emb(probe, torch.arange(max_len, device=p.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)

    def load_prefill(self, cache, attention_mask: torch.Tensor, repeat: int) -> None:
        """Copy the prompt's cache (prompt rows) into the preallocated cache, each row ``repeat`` times."""
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            if repeat > 1:
                k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
            self.keys[i][:, :, :k.shape[2]] = k
            self.values[i][:, :, :v.shape[2]] = v
        mask = attention_mask.bool()
        if repeat > 1:
            mask = mask.repeat_interleave(repeat, 0)
        self.length = mask.shape[1]
        self.valid[:, :self.length] = mask

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (finished rows leave the batch)."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.valid = self.valid.index_select(0, keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of the next token after ``tokens`` (rows,) at ``positions`` (rows,)."""
        rows, t = tokens.shape[0], self.length
        x = F.embedding(tokens[:, None], self.embed)  # (R, 1, H)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (R, 1, 1, head_dim)
        self.valid[:, t] = True
        mask = self.valid[:, None, None, :t + 1]
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        gqa = {"enable_gqa": True} if self.gqa and _NATIVE_GQA else {}
        for i, (w_in, eps_in, w_qkv, b_qkv, w_o, b_o, w_post, eps_post, w_gu, b_gu, w_down, b_down) in \
                enumerate(self.plan):
            qkv = F.linear(_rms(x, w_in, eps_in), w_qkv, b_qkv).view(rows, nq + 2 * nkv, hd)
            qk = qkv[:, :nq + nkv, None]  # (R, nq + nkv, 1, hd): one rope for queries and keys
            qk = qk * cos + self.rotate_half(qk) * sin
            self.keys[i][:, :, t] = qk[:, nq:, 0]
            self.values[i][:, :, t] = qkv[:, nq + nkv:]
            keys, values = self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1]
            if self.gqa and not _NATIVE_GQA:
                keys = keys.repeat_interleave(nq // nkv, 1)
                values = values.repeat_interleave(nq // nkv, 1)
            out = F.scaled_dot_product_attention(qk[:, :nq], keys, values, attn_mask=mask, scale=self.scaling, **gqa)
            x = x + F.linear(out.view(rows, 1, nq * hd), w_o, b_o)
            gate, up = F.linear(_rms(x, w_post, eps_post), w_gu, b_gu).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, w_down, b_down)
        self.length = t + 1
        w_norm, eps, w_head, b_head = self.final
        return F.linear(_rms(x[:, 0], w_norm, eps), w_head, b_head)
