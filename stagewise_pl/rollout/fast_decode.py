"""A lean single-token decode step for Llama-family decoders (Qwen2, Llama), used by HFEngine.

Why: with a small model, one decoding step of ``model(...)`` costs mostly Python and per-op
overhead (mask construction, cache bookkeeping with ``torch.cat``, module dispatch), not
arithmetic. This step does the same arithmetic with fewer ops, on the model's own parameters:
- one product for q, k and v and one for gate and up (weights concatenated once per ``generate``
  call, so they are the current training weights; stored transposed for ``torch.mm``, which at
  small shapes beats ``F.linear``);
- rope as ``q*cos + rotate_half(q)*sin`` in one go for queries and keys, rotate_half as a roll with
  the sign on sin where the modelling file's ``rotate_half`` is the usual half rotation (checked on a
  probe), cos/sin for every position computed once per batch by the model's own rotary module (so
  static rope variants behave as in transformers);
- a preallocated key/value cache written in place (no ``torch.cat`` per step), rows dropped
  with ``index_select`` when they finish;
- attention of the one new position as two batched products with the softmax between, a kv head's
  query heads as the rows of one product (grouped heads without repeating keys), the padding mask
  added to the scores (the CPU flash kernel costs more per call at one query position);
- in float32, each RMSNorm's weight folded into the rows of the product it feeds (a norm is then
  ``x * rsqrt(sum x^2 + width * eps)``, three ops) and the residual adds done by the o/down products
  (``addmm``); in bf16/fp16 RMSNorm, products and adds rounded one by one as transformers does;
  weights and biases gathered once per batch (no module lookups per token).
During ``generate`` the concatenated weights are a copy of the q/k/v and gate/up weights.
In float32 the prompt is prefilled by the same arithmetic (:meth:`FastDecoder.prefill`, keys and
values written straight into the cache); in bf16/fp16 by ``model(...)``, its cache copied in.
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


def folds(model, dtype=None) -> bool:
    """Whether the step is lean (the norms folded into the products, the prompt through :meth:`FastDecoder.prefill`,
    the residual stream, attention and cache in float32) for products in ``dtype`` (None: the model's): float32
    products of float32 weights (bit for bit the same step as before bfloat16 existed), and bfloat16 products of
    float32 or bfloat16 weights. float16 keeps transformers' rounding op by op and its prefill."""
    weights = next(model.parameters()).dtype
    products = dtype or weights
    return products == torch.bfloat16 or (products == torch.float32 and weights == torch.float32)


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
    """RMSNorm as transformers' Llama/Qwen2 modules compute it (in float32, weight applied after); the step's
    bf16/fp16 path (float32 weights take the folded :func:`_scaled`)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _scaled(x: torch.Tensor, eps_width: float) -> torch.Tensor:
    """RMSNorm without its weight and up to a factor sqrt(width), both folded into the next product:
    ``x * rsqrt(sum(x^2) + width * eps)`` (float32)."""
    return x * torch.linalg.vecdot(x, x).add_(eps_width).rsqrt_()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _residual(x: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, bias, fused: bool,
              products=None) -> torch.Tensor:
    """``x + F.linear(inputs, weight, bias)``; in float32 the add rides on the product (one ``addmm``). With
    ``products`` (bfloat16: the lean low-precision step) ``inputs`` are rounded to it, the product and its bias are
    in it, and the sum is in ``x``'s float32."""
    if products is not None:
        h = inputs.to(products)
        return x.add_(torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t()))
    if not fused:
        return x + F.linear(inputs, weight, bias)
    out = torch.addmm(x, inputs, weight.t())
    return out if bias is None else out.add_(bias)


def _cat_bias(*linears):
    """The layers' biases concatenated (zeros for a layer without one), None if none has one."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else
                      torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                      for lin in linears])


class FastDecoder:
    """Decoding state for one batch: call :meth:`load_prefill`, then :meth:`step` per token."""

    def __init__(self, model, rows: int, max_len: int, dtype=None):
        self.model = model
        self.decoder = getattr(model, model.base_model_prefix)
        self.rotate_half = getattr(sys.modules[type(self.decoder.layers[0].self_attn).__module__], "rotate_half",
                                   _rotate_half)
        attn = self.decoder.layers[0].self_attn
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        # per layer, everything the step reads (attribute lookups on modules cost microseconds each); the concatenated
        # q/k/v and gate/up matrices are stored transposed for torch.mm (at small shapes 10-35% faster than F.linear
        # on the weight as it lies; they are copies either way)
        # In float32 each RMSNorm's weight (and sqrt(width)) is folded into the rows of the concatenated product it
        # feeds, so a norm is three ops (x * rsqrt(sum x^2 + width * eps)) instead of F.rms_norm's nine, and the
        # residual adds ride on the o/down products (addmm); in float16 the step rounds as transformers does.
        # In bfloat16 (``dtype``, or a bfloat16 model) the step is the float32 one with its products in bfloat16:
        # the folded weights (folded in float32, then rounded once) and the head are bfloat16 copies, a product's
        # input is rounded to bfloat16 and its output added to the float32 residual stream; norms, rope, attention
        # scores and softmax, the cache and the sampling distribution stay in float32. It is not transformers'
        # bfloat16 arithmetic (which rounds after every op): its agreement with the float32 step is measured
        # (tests/test_rollout.py), not forced bit for bit
        p = next(model.parameters())
        self.fold = folds(model, dtype)
        if not self.fold and dtype not in (None, p.dtype):
            raise ValueError(f"the lean decode step samples in float32 or bfloat16, not {dtype} (weights {p.dtype})")
        products = (dtype or p.dtype) if self.fold else p.dtype
        # None: products in the state's dtype (float32; float16 rounds as transformers does)
        self.products = products if self.fold and products != torch.float32 else None
        state = torch.float32 if self.fold else p.dtype  # residual stream, cache, mask, rope
        width = model.config.hidden_size

        def folded(w: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
            if not self.fold:
                return w
            if w.dtype != torch.float32:
                w, norm_weight = w.float(), norm_weight.float()
            return w.mul_(norm_weight[:, None] * width ** 0.5).to(products)

        def cast(t):
            return t if t is None or self.products is None else t.to(products)

        self.plan = []
        for layer in self.decoder.layers:
            a, m, n_in, n_post = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
            w_qkv = folded(torch.cat([a.q_proj.weight.T, a.k_proj.weight.T, a.v_proj.weight.T], 1), n_in.weight)
            w_gu = folded(torch.cat([m.gate_proj.weight.T, m.up_proj.weight.T], 1), n_post.weight)
            self.plan.append((
                n_in.weight, n_in.variance_epsilon * width if self.fold else n_in.variance_epsilon, w_qkv,
                cast(_cat_bias(a.q_proj, a.k_proj, a.v_proj)), cast(a.o_proj.weight), cast(a.o_proj.bias),
                n_post.weight, n_post.variance_epsilon * width if self.fold else n_post.variance_epsilon, w_gu,
                cast(_cat_bias(m.gate_proj, m.up_proj)), cast(m.down_proj.weight), cast(m.down_proj.bias)))
        head = model.get_output_embeddings()
        self.embed = self.decoder.embed_tokens.weight
        norm = self.decoder.norm
        self.final = (norm.weight.to(state) * width ** 0.5 if self.fold else norm.weight,
                      norm.variance_epsilon * width if self.fold else norm.variance_epsilon, cast(head.weight),
                      cast(getattr(head, "bias", None)))
        shape = (rows, self.n_kv, max_len, self.head_dim)
        # the cache stays in float32 with bfloat16 products: a bfloat16 cache read by bfloat16 batched products was
        # no faster on CPU (they copy the cache's strided slices first) and would round the scores before the softmax
        cache = state
        self.keys = [torch.empty(shape, dtype=cache, device=p.device) for _ in self.decoder.layers]
        self.values = [torch.empty(shape, dtype=cache, device=p.device) for _ in self.decoder.layers]
        # 0 where a row may attend, -inf where it may not (left padding), added to the attention scores
        self.mask = torch.full((rows, max_len), float("-inf"), dtype=cache, device=p.device)
        self.length = 0
        # cos/sin of every position, from the model's own rotary module (static rope types only: see supports)
        self.state = state
        self.live = None  # the cache rows of the batch's rows, when finished rows are still in the cache
        self._last_tokens = torch.zeros(rows, dtype=torch.long, device=p.device)  # what a finished row is fed
        self._last_positions = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.compact_share = 0.25 if self.products is not None else 0.0
        probe = torch.zeros((1, 1, 1), dtype=state, device=p.device)
        cos, sin = self.decoder.rotary_emb(probe, torch.arange(max_len, device=p.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        # the modelling file's rotate_half is (as in Llama/Qwen2) a half-roll with the first half negated: then
        # rotate_half(x) * sin is x.roll(half) * sin with that sign on sin, one op instead of neg + cat
        half, probe = self.head_dim // 2, torch.eye(self.head_dim, dtype=torch.float32, device=p.device)
        sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(p.device)
        self.half_roll = self.head_dim % 2 == 0 and torch.equal(self.rotate_half(probe), probe.roll(half, -1) * sign)
        if self.half_roll:
            self.sin = self.sin * sign.to(self.sin.dtype)

    def _sdpa(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None) -> torch.Tensor:
        """Attention by ``scaled_dot_product_attention`` of queries (rows, heads, L, head_dim) over keys/values
        (rows, kv heads, T, head_dim) under an additive ``mask`` (rows, 1, L, T) (default: the padding mask of one
        position): (rows * L, H)."""
        nq, nkv, t = self.n_heads, self.n_kv, keys.shape[2]
        gqa = {"enable_gqa": True} if nq != nkv and _NATIVE_GQA else {}
        if nq != nkv and not _NATIVE_GQA:
            keys, values = keys.repeat_interleave(nq // nkv, 1), values.repeat_interleave(nq // nkv, 1)
        mask = self.mask[:, None, None, :t] if mask is None else mask
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scaling, **gqa)
        return out.transpose(1, 2).reshape(queries.shape[0] * queries.shape[2], nq * self.head_dim)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                repeat: int) -> torch.Tensor:
        """Float32 only (the folded weights): run the left-padded prompts (rows, L) through the step's own
        arithmetic, write their keys/values into the cache (each prompt row ``repeat`` times) and return the
        logits of the token after each prompt (rows, V). Replaces a ``model(...)`` prefill and its cache copy."""
        b, length = input_ids.shape
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qk_end, v_end = (nq + nkv) * hd, (nq + 2 * nkv) * hd
        real = attention_mask.bool()
        # causal over real keys; each position also sees itself, so a padding query's softmax stays finite (its
        # output is never read, but its keys/values are cached: they must be finite to be masked to exactly 0)
        allowed = torch.ones(length, length, dtype=torch.bool, device=real.device).tril() & real[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=real.device)
        mask = torch.zeros(allowed.shape, dtype=self.state, device=real.device).masked_fill_(
            ~allowed, float("-inf"))[:, None]
        x = self._embed(input_ids.reshape(-1))  # (b * L, H)
        cos, sin = self.cos[positions.reshape(-1)][:, None], self.sin[positions.reshape(-1)][:, None]
        for i, (_, eps_in, w_qkv, b_qkv, w_o, b_o, _, eps_post, w_gu, b_gu, w_down, b_down) in enumerate(self.plan):
            qkv = self._product(_scaled(x, eps_in), w_qkv, b_qkv)
            qk = qkv[:, :qk_end].view(-1, nq + nkv, hd)
            rotated = qk.roll(hd // 2, -1) if self.half_roll else self.rotate_half(qk)
            qk = torch.addcmul(qk * cos, rotated, sin).view(b, length, nq + nkv, hd).transpose(1, 2)
            keys, values = qk[:, nq:], qkv[:, qk_end:v_end].view(b, length, nkv, hd).transpose(1, 2)
            self.keys[i][:, :, :length].view(b, repeat, nkv, length, hd).copy_(keys[:, None])
            self.values[i][:, :, :length].view(b, repeat, nkv, length, hd).copy_(values[:, None])
            x = _residual(x, self._sdpa(qk[:, :nq], keys, values, mask), w_o, b_o, True, self.products)
            gate, up = self._product(_scaled(x, eps_post), w_gu, b_gu, keep=True).chunk(2, -1)
            x = _residual(x, F.silu(gate) * up, w_down, b_down, True, self.products)
        self._set_padding(attention_mask, repeat)
        w_norm, eps, w_head, b_head = self.final
        return self._logits(_scaled(x.view(b, length, -1)[:, -1], eps) * w_norm, w_head, b_head)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        return x if x.dtype == self.state else x.to(self.state)

    def _product(self, h: torch.Tensor, weight: torch.Tensor, bias, keep: bool = False) -> torch.Tensor:
        """``h @ weight (+ bias)``; with low-precision products ``h`` is rounded to their dtype and the result is
        returned in float32 (``keep``: in the products' dtype, for the MLP's elementwise gate)."""
        if self.products is not None:
            h = h.to(self.products)
        out = torch.mm(h, weight) if bias is None else torch.addmm(bias, h, weight)
        return out if keep or self.products is None else out.float()

    def _logits(self, h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return F.linear(h if self.products is None else h.to(self.products), weight, bias)

    def _set_padding(self, attention_mask: torch.Tensor, repeat: int) -> None:
        """The prompt's positions in the additive mask (0 where a row may attend, -inf at its left padding), each
        prompt row ``repeat`` times; the cache then holds the prompt."""
        real = attention_mask.bool().repeat_interleave(repeat, 0)
        self.length = real.shape[1]
        self.mask[:, :self.length] = torch.zeros_like(real, dtype=self.mask.dtype).masked_fill_(~real, float("-inf"))

    def load_prefill(self, cache, attention_mask: torch.Tensor, repeat: int) -> None:
        """Copy the prompt's cache (prompt rows) into the preallocated cache, each row ``repeat`` times."""
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            if repeat > 1:
                k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
            self.keys[i][:, :, :k.shape[2]] = k
            self.values[i][:, :, :v.shape[2]] = v
        self._set_padding(attention_mask, repeat)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (finished rows leave the batch). The cache's rows are dropped at once in float32
        (as before bfloat16 existed); with low-precision products only once finished rows are ``compact_share`` of
        the cache's rows: until then they stay in the cache and are computed (their outputs never read), which costs
        less than copying every layer's cache at each finish."""
        live = keep if self.live is None else self.live.index_select(0, keep)
        if self.keys[0].shape[0] - len(live) < self.compact_share * self.keys[0].shape[0]:
            self.live = live
            return
        self.keys = [k.index_select(0, live) for k in self.keys]
        self.values = [v.index_select(0, live) for v in self.values]
        self.mask = self.mask.index_select(0, live)
        self.live = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of the next token after ``tokens`` (rows,) at ``positions`` (rows,)."""
        live = self.live
        if live is not None:  # finished rows still in the cache: fed their last token again, at its position
            tokens = self._last_tokens.index_copy(0, live, tokens)
            positions = self._last_positions.index_copy(0, live, positions)
        self._last_tokens, self._last_positions = tokens, positions
        rows, t = tokens.shape[0], self.length
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        group, qk_end, v_end = nq // nkv, (nq + nkv) * hd, (nq + 2 * nkv) * hd
        x = self._embed(tokens)  # (R, H)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (R, 1, head_dim)
        self.mask[:, t] = 0
        # one query position: a kv head's `group` query heads are the rows of one product (grouped heads without
        # repeating keys); the mask is expanded once for every layer. In float32 only: in bf16/fp16 the scores would
        # be rounded to that dtype before the softmax, where sdpa keeps them in float32, and a fused rope rounds
        # once where transformers rounds each product (bf16/fp16 keep the transformers path's log-probs exactly)
        fold = self.fold
        mask = self.mask[:, None, None, :t + 1].expand(rows, nkv, 1, t + 1).reshape(rows * nkv, 1, t + 1) \
            if fold else None
        for i, (w_in, eps_in, w_qkv, b_qkv, w_o, b_o, w_post, eps_post, w_gu, b_gu, w_down, b_down) in \
                enumerate(self.plan):
            h = _scaled(x, eps_in) if fold else _rms(x, w_in, eps_in)
            qkv = self._product(h, w_qkv, b_qkv)
            qk = qkv[:, :qk_end].view(rows, nq + nkv, hd)
            rotated = qk.roll(hd // 2, -1) if self.half_roll else self.rotate_half(qk)
            qk = torch.addcmul(qk * cos, rotated, sin) if fold else qk * cos + rotated * sin  # rope
            self.keys[i][:, :, t] = qk[:, nq:]
            self.values[i][:, :, t] = qkv[:, qk_end:v_end].view(rows, nkv, hd)
            if mask is not None:
                keys = self.keys[i][:, :, :t + 1].reshape(rows * nkv, t + 1, hd)  # views
                values = self.values[i][:, :, :t + 1].reshape(rows * nkv, t + 1, hd)
                queries = qk[:, :nq].reshape(rows * nkv, group, hd).to(keys.dtype)
                scores = torch.baddbmm(mask, queries, keys.transpose(1, 2), alpha=self.scaling)
                out = torch.bmm(torch.softmax(scores, -1, dtype=torch.float32).to(values.dtype), values)
                out = out.view(rows, nq * hd)
            else:
                out = self._sdpa(qk[:, :nq, None], self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1])
            x = _residual(x, out, w_o, b_o, fold, self.products)
            h = _scaled(x, eps_post) if fold else _rms(x, w_post, eps_post)
            gate, up = self._product(h, w_gu, b_gu, keep=True).chunk(2, -1)
            x = _residual(x, F.silu(gate) * up, w_down, b_down, fold, self.products)
        self.length = t + 1
        w_norm, eps, w_head, b_head = self.final
        if live is not None:
            x = x.index_select(0, live)
        h = _scaled(x, eps) * w_norm if self.fold else _rms(x, w_norm, eps)
        return self._logits(h, w_head, b_head)
