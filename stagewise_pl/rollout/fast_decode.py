"""A lean single-token decode step for Llama-family decoders (Qwen2, Llama), used by HFEngine.

Why: with a small model, one decoding step of ``model(...)`` costs mostly Python and per-op
overhead (mask construction, cache bookkeeping with ``torch.cat``, module dispatch), not
arithmetic. This step does the same arithmetic with fewer ops, on the model's own parameters:
- one matmul for q, k and v and one for gate and up (weights concatenated once per ``generate``
  call, so they are the current training weights);
- a preallocated key/value cache written in place (no ``torch.cat`` per step), rows dropped
  with ``index_select`` when they finish;
- cos/sin for every position computed once per batch by the model's own rotary module, and its
  ``apply_rotary_pos_emb`` (so static rope variants behave as in transformers); RMSNorm as one
  ``F.rms_norm``; ``scaled_dot_product_attention`` with grouped heads.
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
        self.rope = sys.modules[type(self.decoder.layers[0].self_attn).__module__].apply_rotary_pos_emb
        attn = self.decoder.layers[0].self_attn
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.gqa = self.n_heads != self.n_kv
        self.fused = []
        for layer in self.decoder.layers:
            a, m = layer.self_attn, layer.mlp
            self.fused.append((torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                               _cat_bias(a.q_proj, a.k_proj, a.v_proj),
                               torch.cat([m.gate_proj.weight, m.up_proj.weight]), _cat_bias(m.gate_proj, m.up_proj)))
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
        self.norm_eps = [(layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
                         for layer in self.decoder.layers]

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
        x = self.decoder.embed_tokens(tokens[:, None])  # (R, 1, H)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (R, 1, head_dim)
        self.valid[:, t] = True
        mask = self.valid[:, None, None, :t + 1]
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        for i, layer in enumerate(self.decoder.layers):
            w_qkv, b_qkv, w_gu, b_gu = self.fused[i]
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm.weight, self.norm_eps[i][0])
            qkv = F.linear(h, w_qkv, b_qkv)
            q = qkv[..., :nq * hd].view(rows, 1, nq, hd).transpose(1, 2)
            k = qkv[..., nq * hd:(nq + nkv) * hd].view(rows, 1, nkv, hd).transpose(1, 2)
            v = qkv[..., (nq + nkv) * hd:].view(rows, 1, nkv, hd).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.keys[i][:, :, t:t + 1] = k
            self.values[i][:, :, t:t + 1] = v
            keys, values = self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1]
            if self.gqa and not _NATIVE_GQA:
                keys = keys.repeat_interleave(nq // nkv, 1)
                values = values.repeat_interleave(nq // nkv, 1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                 **({"enable_gqa": True} if self.gqa and _NATIVE_GQA else {}))
            x = x + a.o_proj(out.transpose(1, 2).reshape(rows, 1, nq * hd))
            h = _rms(x, layer.post_attention_layernorm.weight, self.norm_eps[i][1])
            gate, up = F.linear(h, w_gu, b_gu).chunk(2, -1)
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
        self.length = t + 1
        return self.model.get_output_embeddings()(self.decoder.norm(x)[:, 0])
