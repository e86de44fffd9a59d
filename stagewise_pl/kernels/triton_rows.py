"""Triton row ops for the fused log-prob kernels: the per-block arithmetic of ``TorchRowOps``.

The matrix products stay in torch (cuBLAS); each row of a float32 logits block is handled by one
Triton program that walks the vocabulary in tiles: the statistics pass (row max, sum of
exponentials, entropy accumulator, target logit) rewrites the block in place, and the gradient
pass turns it into d(loss)/d(logits) in place, so no second block is ever allocated.
Same contract and results as ``TorchRowOps``; on CPU tensors it runs under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check it without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 1024


@triton.jit
def _stats_kernel(z_ptr, stride, n_cols, target_ptr, in_block_ptr, m_ptr, s_ptr, t_ptr, tl_ptr,
                  WITH_ENTROPY: tl.constexpr, TILE: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row * stride
    m = -float("inf")
    for start in range(0, n_cols, TILE):
        cols = start + tl.arange(0, TILE)
        z = tl.load(base + cols, mask=cols < n_cols, other=-float("inf"))
        m = tl.maximum(m, tl.max(z, 0))
    target = tl.load(target_ptr + row)
    inside = tl.load(in_block_ptr + row)
    safe = tl.minimum(tl.maximum(target, 0), n_cols - 1)
    target_logit = tl.where(inside != 0, tl.load(base + safe), 0.0)
    s = 0.0
    t = 0.0
    for start in range(0, n_cols, TILE):
        cols = start + tl.arange(0, TILE)
        valid = cols < n_cols
        y = tl.load(base + cols, mask=valid, other=0.0) - m
        y = tl.where(valid, y, 0.0)  # padding lanes: finite, and their e is 0
        e = tl.where(valid, tl.exp(y), 0.0)
        s += tl.sum(e, 0)
        if WITH_ENTROPY:
            t += tl.sum(e * y, 0)
            tl.store(base + cols, y, mask=valid)
        else:
            tl.store(base + cols, e, mask=valid)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)
    tl.store(tl_ptr + row, target_logit)


@triton.jit
def _grad_kernel(z_ptr, stride, n_cols, shift_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, target_ptr, in_block_ptr,
                 FROM_EXP: tl.constexpr, WITH_ENTROPY: tl.constexpr, TILE: tl.constexpr):
    """FROM_EXP: the block holds exp(z - m) and shift_ptr the row sums s (no entropy);
    else the block holds logits and z - shift = log p."""
    row = tl.program_id(0)
    base = z_ptr + row * stride
    shift = tl.load(shift_ptr + row)
    g = tl.load(g_logp_ptr + row)
    h = 0.0
    g_h = 0.0
    if WITH_ENTROPY:
        h = tl.load(entropy_ptr + row)
        g_h = tl.load(g_ent_ptr + row)
    for start in range(0, n_cols, TILE):
        cols = start + tl.arange(0, TILE)
        valid = cols < n_cols
        z = tl.load(base + cols, mask=valid, other=0.0)
        if FROM_EXP:
            dz = z * (-g / shift)
        else:
            y = z - shift
            p = tl.exp(y)
            if WITH_ENTROPY:
                dz = p * (-g - g_h * (y + h))
            else:
                dz = -g * p
        tl.store(base + cols, dz, mask=valid)
    target = tl.load(target_ptr + row)
    inside = tl.load(in_block_ptr + row)
    if inside != 0:
        current = tl.load(base + target)
        tl.store(base + target, current + g)


def _rows(z: torch.Tensor) -> tuple[int]:
    if z.stride(1) != 1:
        raise ValueError("row ops need a row-major logits block")
    return (z.shape[0],)


class TritonRowOps:
    @staticmethod
    def stats(z, local_target, in_block, with_entropy):
        n = z.shape[0]
        m, s, t, target_logit = (torch.empty(n, device=z.device, dtype=torch.float32) for _ in range(4))
        _stats_kernel[_rows(z)](z, z.stride(0), z.shape[1], local_target.contiguous(),
                                in_block.to(torch.int32).contiguous(), m, s, t, target_logit,
                                WITH_ENTROPY=with_entropy, TILE=TILE)
        return m, s, (t if with_entropy else None), target_logit

    @staticmethod
    def grad_(z, shift, entropy, g_logp, g_entropy, local_target, in_block):
        with_entropy = g_entropy is not None
        _grad_kernel[_rows(z)](z, z.stride(0), z.shape[1], shift.contiguous(),
                               entropy.contiguous() if with_entropy else shift, g_logp.contiguous(),
                               g_entropy.contiguous() if with_entropy else g_logp, local_target.contiguous(),
                               in_block.to(torch.int32).contiguous(), FROM_EXP=False, WITH_ENTROPY=with_entropy,
                               TILE=TILE)
        return z

    @staticmethod
    def grad_from_exp_(e, s, g_logp, local_target, in_block):
        _grad_kernel[_rows(e)](e, e.stride(0), e.shape[1], s.contiguous(), s, g_logp.contiguous(), g_logp,
                               local_target.contiguous(), in_block.to(torch.int32).contiguous(), FROM_EXP=True,
                               WITH_ENTROPY=False, TILE=TILE)
        return e
