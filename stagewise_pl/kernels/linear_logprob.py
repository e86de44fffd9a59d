"""Log-probabilities of chosen tokens straight from hidden states and the LM head, without logits.

``logits = hidden @ W.T`` is a ``[tokens x vocab]`` tensor (151 936 columns for Qwen) that runs RL
and long-context SFT out of memory. Here tokens are processed in chunks, and a chunk's vocabulary
in blocks when one chunk's logits would still be large; per block only per-token statistics are
kept (running max, sum of exponentials, and for the entropy the exp-weighted sum of logits), merged
across blocks with an online log-sum-exp. Backward recomputes each chunk's logits block by block.

Two entry points:
- :class:`LinearLogProb` -- ``(logp, entropy)`` as an autograd Function (4 matrix products for
  forward + backward: logits, then recomputed logits, grad-hidden and grad-weight).
- :func:`fused_token_loss` -- a scalar loss ``sum_t f_t(logp_t, entropy_t)`` whose per-token
  derivatives are known as soon as the chunk's log-probs are: the gradients to hidden, weight and
  bias are computed during the forward pass, from the logits block still in memory, so forward +
  backward costs 3 matrix products when a chunk's vocabulary is one block. ``f`` is any token-local
  torch function (the GRPO surrogate, the SFT NLL); its derivatives come from autograd on the
  small per-token tensors, so the loss is written once, in :mod:`stagewise_pl.losses`.

Statistics and gradients are computed in float32 (the weight gradient of bf16 inputs may instead be summed over
chunks in bf16, ``Plan.grad_w_dtype``: one rounding per chunk, half the memory). The matrix products either upcast
bf16/fp16 inputs block by block (the CPU plan) or run in the input dtype with float32 accumulation and float32 results
(``Plan.matmul_dtype``, the CUDA plan of :func:`stagewise_pl.kernels.plan.device_plan`: tensor cores).
The per-block arithmetic ("row ops") has a torch implementation here and a Triton one in ``triton_rows.py``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


# ------------------------------------------------------------------------------------------ row ops
class TorchRowOps:
    """Per-block arithmetic on a float32 logits block ``z``, in place.

    ``stats`` leaves the block as ``z - m`` (with entropy) or ``exp(z - m)`` (without), from which
    ``grad_`` (given ``shift`` with ``z - shift = log p``) or ``grad_from_exp_`` finish the gradient
    without recomputing the logits: this is what makes the fused loss single-pass.
    """

    @staticmethod
    def stats(z: torch.Tensor, local_target: torch.Tensor, in_block: torch.Tensor, with_entropy: bool):
        """(row max m, sum exp(z-m), sum exp(z-m)*(z-m) or None, target logit where in_block else 0)."""
        rows = torch.arange(z.shape[0], device=z.device)
        target_logit = torch.where(in_block, z[rows, local_target.clamp(0, z.shape[1] - 1)], 0.0)
        m = z.max(dim=-1).values  # (n,)
        y = z.sub_(m[:, None])  # z - m, in place
        if with_entropy:
            e = torch.exp(y)  # the one temporary block
            return m, e.sum(-1), torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).view(-1), target_logit
        return m, y.exp_().sum(-1), None, target_logit  # the block now holds exp(z - m)

    @staticmethod
    def grad_(z: torch.Tensor, shift: torch.Tensor, entropy: Optional[torch.Tensor], g_logp: torch.Tensor,
              g_entropy: Optional[torch.Tensor], local_target: torch.Tensor, in_block: torch.Tensor) -> torch.Tensor:
        """d/dz of sum(g_logp*logp + g_entropy*H), in place, where ``z - shift`` is log p:
        g_logp*(onehot - p) - g_entropy*p*(log p + H)."""
        y = z.sub_(shift[:, None])  # log p
        if g_entropy is not None:
            p = torch.exp(y)
            dz = y.add_(entropy[:, None]).mul_(-g_entropy[:, None]).sub_(g_logp[:, None]).mul_(p)
        else:
            dz = y.exp_().mul_(-g_logp[:, None])
        rows = torch.nonzero(in_block).view(-1)
        dz[rows, local_target[rows]] += g_logp[rows]
        return dz

    @staticmethod
    def grad_from_exp_(e: torch.Tensor, s: torch.Tensor, g_logp: torch.Tensor, local_target: torch.Tensor,
                       in_block: torch.Tensor) -> torch.Tensor:
        """Same as ``grad_`` without entropy, from a block holding exp(z - m) and its row sums s."""
        dz = e.mul_((-g_logp / s)[:, None])
        rows = torch.nonzero(in_block).view(-1)
        dz[rows, local_target[rows]] += g_logp[rows]
        return dz


def row_ops(backend: str):
    if backend == "triton":
        from stagewise_pl.kernels.triton_rows import TritonRowOps

        return TritonRowOps
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r} (torch | triton)")
    return TorchRowOps


# ------------------------------------------------------------------------------------------ one chunk
_OUT_DTYPE_OK: dict[str, bool] = {}


def _no_out_dtype(op: str, exc: Exception) -> None:
    import warnings

    _OUT_DTYPE_OK[op] = False
    warnings.warn(f"torch.{op} with out_dtype failed here ({type(exc).__name__}: {exc}); the fused kernels widen "
                  f"their low-precision products to float32 instead (same results, slower, more memory)")


def addmm_acc_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * a @ b`` for low-precision ``a``, ``b`` and a float32 ``out``: on CUDA one product in the
    inputs' dtype accumulating into ``out`` (addmm's ``out_dtype``: tensor cores, no temporary); elsewhere, or on
    a torch without it, the same arithmetic with the inputs widened (bf16/fp16 products are exact in float32)."""
    if out.is_cuda and _OUT_DTYPE_OK.get("addmm", True):
        try:
            return torch.addmm(out, a, b, out_dtype=out.dtype, alpha=alpha, out=out)
        except (RuntimeError, TypeError) as exc:
            _no_out_dtype("addmm", exc)
    return out.addmm_(a.to(out.dtype), b.to(out.dtype), alpha=alpha)


def mm_acc(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype`` (float32) from low-precision inputs; see :func:`addmm_acc_`."""
    if a.is_cuda and _OUT_DTYPE_OK.get("mm", True):
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (RuntimeError, TypeError) as exc:
            _no_out_dtype("mm", exc)
    return a.to(dtype) @ b.to(dtype)


FP16_TARGET = 2.0 ** 14  # the largest |d logits| of a chunk is scaled to about this before its float16 rounding


def to_low(dz: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(``dz * scale`` in ``dtype``, ``scale``): float16's range would flush a chunk's small logit gradients to
    zero (a token's share of a mean loss times a small probability is far below 6e-8), so its chunk is scaled by a
    power of two first (exact) and the products divide it out (``alpha``); bfloat16 has float32's range: 1."""
    if dtype != torch.float16:
        return dz.to(dtype), 1.0
    peak = float(dz.abs().max())
    if peak == 0.0 or not math.isfinite(peak):
        return dz.to(dtype), 1.0
    scale = 2.0 ** math.floor(math.log2(FP16_TARGET / peak))
    return (dz * scale).to(dtype), scale


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits_block(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v0: int, v1: int,
                  temperature: float) -> torch.Tensor:
    """The (n, Vb) logits block in the accumulation dtype; ``x`` in that dtype (weight upcast), or in a
    low-precision one (the product in that dtype, float32 accumulation)."""
    acc = _acc(x)
    if x.dtype == acc:
        w = weight[v0:v1].to(acc)
        z = x @ w.T if bias is None else torch.addmm(bias[v0:v1].to(acc), x, w.T)
    else:
        z = mm_acc(x, weight[v0:v1].to(x.dtype).T, acc)
        if bias is not None:
            z.add_(bias[v0:v1].to(acc))
    if temperature != 1.0:
        z.div_(temperature)
    return z


@dataclass
class ChunkStats:
    lse: torch.Tensor  # (n,)
    logp: torch.Tensor  # (n,) 0 where not valid
    entropy: Optional[torch.Tensor]  # (n,)
    block: Optional[tuple]  # the single logits block left by stats (single-block vocab only)


def chunk_stats(ops, x, weight, bias, targets, valid, temperature, vocab_block, with_entropy) -> ChunkStats:
    """Online log-sum-exp over vocabulary blocks for one chunk of tokens (x float32/64, or the matrix products'
    low-precision dtype)."""
    n, vocab = x.shape[0], weight.shape[0]
    like = dict(device=x.device, dtype=_acc(x))
    big_m = torch.full((n,), float("-inf"), **like)
    big_s = torch.zeros(n, **like)
    big_a = torch.zeros(n, **like) if with_entropy else None  # sum exp(z - M) * z
    target_logit = torch.zeros(n, **like)
    block = None
    for v0 in range(0, vocab, vocab_block):
        v1 = min(v0 + vocab_block, vocab)
        z = _logits_block(x, weight, bias, v0, v1, temperature)
        in_block = valid & (targets >= v0) & (targets < v1)
        m, s, t, target_block = ops.stats(z, targets - v0, in_block, with_entropy)
        target_logit += target_block
        new_m = torch.maximum(big_m, m)
        old_scale, block_scale = torch.exp(big_m - new_m), torch.exp(m - new_m)
        big_s = big_s * old_scale + s * block_scale
        if with_entropy:
            big_a = big_a * old_scale + (t + m * s) * block_scale
        big_m = new_m
        if v1 - v0 == vocab:
            block = (z, m, s)
    lse = big_m + torch.log(big_s)
    logp = torch.where(valid, target_logit - lse, 0.0)
    entropy = torch.where(valid, lse - big_a / big_s, 0.0) if with_entropy else None
    return ChunkStats(lse, logp, entropy, block)


def chunk_grad(ops, x, weight, bias, targets, valid, temperature, vocab_block, stats: ChunkStats, g_logp,
               g_entropy, grad_w, grad_b, reuse_block: bool) -> torch.Tensor:
    """Gradient of sum(g_logp*logp + g_entropy*H) to the chunk's rows; adds into grad_w and grad_b.

    With ``reuse_block`` (single-block vocabulary, block kept by ``chunk_stats``) no logits are
    recomputed; otherwise each block is recomputed (the recompute-in-backward path).
    """
    vocab, acc = weight.shape[0], _acc(x)
    g_logp = torch.where(valid, g_logp.to(acc), 0.0)
    g_entropy = None if g_entropy is None else torch.where(valid, g_entropy.to(acc), 0.0)
    grad_x = None  # the first block's product writes it (no zero-fill pass)
    for v0 in range(0, vocab, vocab_block):
        v1 = min(v0 + vocab_block, vocab)
        in_block = valid & (targets >= v0) & (targets < v1)
        if reuse_block and stats.block is not None:
            z, m, s = stats.block
            if stats.entropy is None:
                dz = ops.grad_from_exp_(z, s, g_logp, targets - v0, in_block)
            else:  # the block holds z - m; log p = (z - m) - (lse - m)
                dz = ops.grad_(z, stats.lse - m, stats.entropy, g_logp, g_entropy, targets - v0, in_block)
        else:
            z = _logits_block(x, weight, bias, v0, v1, temperature)
            dz = ops.grad_(z, stats.lse, stats.entropy, g_logp, g_entropy, targets - v0, in_block)
        if temperature != 1.0:
            dz.div_(temperature)
        if x.dtype == acc:
            w_block = weight[v0:v1].to(acc)
            grad_x = dz @ w_block if grad_x is None else grad_x.addmm_(dz, w_block)
            grad_w[v0:v1].addmm_(dz.T, x)
        else:  # the gradient products in x's dtype too, accumulated in float32
            dz_low, scale = to_low(dz, x.dtype)
            if grad_x is None:
                grad_x = torch.zeros(x.shape, device=x.device, dtype=acc)
            addmm_acc_(grad_x, dz_low, weight[v0:v1].to(x.dtype), alpha=1.0 / scale)
            if grad_w.dtype == x.dtype:  # Plan.grad_w_dtype: the chunk's float32 product rounded once as it is added
                grad_w[v0:v1].addmm_(dz_low.T, x, alpha=1.0 / scale)
            else:
                addmm_acc_(grad_w[v0:v1], dz_low.T, x, alpha=1.0 / scale)
        if grad_b is not None:
            grad_b[v0:v1] += dz.sum(0)
    return grad_x


# ------------------------------------------------------------------------------------------ autograd
def without_autocast(fn):
    """Run ``fn`` with autocast off. Under ``trainer.precision=bf16-mixed`` the forward, and the backward that
    ``manual_backward`` starts inside the training step, run in an autocast region: it would silently turn the
    kernel's products into bfloat16 ones (the saved logits block then mismatches the float32 gradient buffers).
    The kernel chooses its own product dtypes (its chunk plan), from the dtypes of the tensors it is given."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), \
                (torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()):
            return fn(*args, **kwargs)
    return run


def accumulation_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests, gradcheck); everything else accumulates in float32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class LinearLogProb(torch.autograd.Function):
    """(logp, entropy) of ``targets`` under softmax((hidden @ W.T + b) / T); recompute in backward."""

    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy, chunk_plan, backend):
        ops = row_ops(backend)
        acc = accumulation_dtype(hidden)
        x_all, t_all = hidden, targets
        n = x_all.shape[0]
        logp = torch.zeros(n, device=hidden.device, dtype=acc)
        entropy = torch.zeros(n, device=hidden.device, dtype=acc) if with_entropy else None
        lse = torch.zeros(n, device=hidden.device, dtype=acc)
        for c0 in range(0, n, chunk_plan.chunk_tokens):
            c1 = min(c0 + chunk_plan.chunk_tokens, n)
            t = t_all[c0:c1]
            valid = t != ignore_index
            x = x_all[c0:c1].to(chunk_plan.matmul_dtype or acc)
            st = chunk_stats(ops, x, weight, bias, t, valid, temperature, chunk_plan.vocab_block,
                             with_entropy)
            logp[c0:c1], lse[c0:c1] = st.logp, st.lse
            if with_entropy:
                entropy[c0:c1] = st.entropy
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if with_entropy else lse)
        ctx.config = (temperature, ignore_index, with_entropy, chunk_plan, backend)
        out_logp = logp.to(hidden.dtype)
        return (out_logp, entropy.to(hidden.dtype)) if with_entropy else (out_logp, None)

    @staticmethod
    @without_autocast
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, chunk_plan, backend = ctx.config
        ops = row_ops(backend)
        acc = accumulation_dtype(hidden)
        if not with_entropy:
            entropy, g_entropy = None, None
        elif g_entropy is None:
            g_entropy = torch.zeros_like(lse)
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        like = dict(device=hidden.device, dtype=acc)
        w_like = dict(like, dtype=chunk_plan.grad_w_dtype or acc)
        grad_w = torch.zeros(weight.shape, **w_like) if ctx.needs_input_grad[1] else None
        grad_w_buf = grad_w if grad_w is not None else torch.zeros(weight.shape, **w_like)
        grad_b = torch.zeros(bias.shape, **like) if bias is not None else None
        grad_h = torch.empty(hidden.shape, **like)  # every chunk writes its rows
        n = hidden.shape[0]
        for c0 in range(0, n, chunk_plan.chunk_tokens):
            c1 = min(c0 + chunk_plan.chunk_tokens, n)
            t = targets[c0:c1]
            valid = t != ignore_index
            st = ChunkStats(lse[c0:c1], None, None if entropy is None else entropy[c0:c1], None)
            x = hidden[c0:c1].to(chunk_plan.matmul_dtype or acc)
            grad_h[c0:c1] = chunk_grad(ops, x, weight, bias, t, valid, temperature,
                                       chunk_plan.vocab_block, st, g_logp[c0:c1],
                                       None if g_entropy is None else g_entropy[c0:c1], grad_w_buf, grad_b,
                                       reuse_block=False)
        return (grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


TokenLoss = Callable[[torch.Tensor, Optional[torch.Tensor], slice], torch.Tensor]


class FusedTokenLoss(torch.autograd.Function):
    """A scalar loss of per-token log-probs (and entropies) with its gradients computed in forward."""

    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy, chunk_plan, backend,
                token_loss: TokenLoss):
        ops = row_ops(backend)
        like = dict(device=hidden.device, dtype=accumulation_dtype(hidden))
        n = hidden.shape[0]
        total = torch.zeros((), **like)
        grad_h = torch.empty(hidden.shape, **like)  # every chunk writes its rows: no zero-fill pass
        grad_w = torch.zeros(weight.shape, **dict(like, dtype=chunk_plan.grad_w_dtype or like["dtype"]))
        grad_b = torch.zeros(bias.shape, **like) if bias is not None else None
        logp_all = torch.empty(n, **like)
        entropy_all = torch.empty(n, **like) if with_entropy else None
        single_block = chunk_plan.vocab_block >= weight.shape[0]
        for c0 in range(0, n, chunk_plan.chunk_tokens):
            c1 = min(c0 + chunk_plan.chunk_tokens, n)
            t = targets[c0:c1]
            valid = t != ignore_index
            x = hidden[c0:c1].to(chunk_plan.matmul_dtype or like["dtype"])
            st = chunk_stats(ops, x, weight, bias, t, valid, temperature, chunk_plan.vocab_block, with_entropy)
            # per-token derivatives of the loss: autograd on (n,)-sized tensors, the loss written once
            with torch.enable_grad():
                lp = st.logp.detach().requires_grad_(True)
                ent = st.entropy.detach().requires_grad_(True) if with_entropy else None
                loss = token_loss(lp, ent, slice(c0, c1))
                grads = torch.autograd.grad(loss, [lp] + ([ent] if with_entropy else []), allow_unused=True)
            g_logp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
            g_ent = (grads[1] if grads[1] is not None else torch.zeros_like(lp)) if with_entropy else None
            total += loss.detach()
            grad_h[c0:c1] = chunk_grad(ops, x, weight, bias, t, valid, temperature, chunk_plan.vocab_block, st,
                                       g_logp, g_ent, grad_w, grad_b, reuse_block=single_block)
            logp_all[c0:c1] = st.logp
            if with_entropy:
                entropy_all[c0:c1] = st.entropy
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else grad_w)
        ctx.has_bias, ctx.dtypes = bias is not None, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp_all)
        if with_entropy:
            ctx.mark_non_differentiable(entropy_all)
        return total, logp_all, entropy_all

    @staticmethod
    def backward(ctx, g_total, _g_logp, _g_entropy):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # scaled in place: a second copy of a [vocab x hidden] gradient is what this kernel exists to avoid
        grads = [grad_h, grad_w] + ([grad_b] if ctx.has_bias else [])
        if not bool(g_total == 1):
            for grad in grads:
                grad.mul_(g_total)
        return (grad_h.to(h_dtype), grad_w.to(w_dtype), grad_b.to(b_dtype) if ctx.has_bias else None,
                None, None, None, None, None, None, None)
