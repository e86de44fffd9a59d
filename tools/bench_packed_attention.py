"""Attention over packed GRPO rows: the dense block mask the policy's forward uses beside a split that computes
only the pairs a completion attends to. Measures what skipping the masked pairs could save on the CPU.

The GRPO forward packs each prompt once with its G completions after it (stagewise_pl.models.packed):
one row per prompt, a boolean block mask (a completion sees the prompt and itself, causally). The CPU flash
kernel computes every pair of such a row, masked or not, about 7x the pairs that count at the GRPO bench's
shapes. The split computes two attentions and merges them by their log-sum-exp (the ring-attention identity):
  - every completion query against its prompt's keys (a small dense product, masked by prompt length);
  - every query against a window of 2W keys around its block of W positions, W the longest segment (a prompt or
    a completion), masked to its own segment, causally;
and its backward calls the flash backward of each part with the merged output and log-sum-exp, which gives
the exact gradient. It is a measurement, not a code path of the package.

    python tools/bench_packed_attention.py [--repeats 50]

Shapes default to tools/bench_grpo.py's tiny-model step: 4 prompts of 14-19 tokens, 8 completions of 18-32
tokens each, 4 query heads, 2 key/value heads of 32 dims; float32, 2 threads. Printed per layer: forward +
backward milliseconds, the flash kernels' share of it (torch profiler), the pairs computed, and the largest
difference from the dense path in float64 (output and gradients).
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def packed_rows(prompts: int, completions: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Segment ids (U, L): 0 the prompt, k the k-th completion, unique negatives the padding; prompt lengths."""
    rng = random.Random(seed)
    plen = [rng.randint(14, 19) for _ in range(prompts)]
    rows = [[0] * p + [c for c in range(1, completions + 1) for _ in range(rng.randint(18, 32))] for p in plen]
    width = max(map(len, rows))
    seg = -2 - torch.arange(prompts * width).view(prompts, width)
    for u, row in enumerate(rows):
        seg[u, :len(row)] = torch.tensor(row)
    return seg, plen


def additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def split_plan(seg: torch.Tensor, plen: list[int], dtype) -> dict:
    """The split's masks, built once per batch (every layer shares them)."""
    rows, length = seg.shape
    width = max(int(torch.unique_consecutive(s, return_counts=True)[1].max()) for s in seg)
    blocks = -(-length // width)
    padded = torch.cat([-3 - torch.arange(width).expand(rows, width), seg,
                        -10 ** 6 - torch.arange(blocks * width - length).expand(rows, -1)], 1)
    pos = torch.arange((blocks + 1) * width)
    qseg, kseg = padded[:, width:].view(rows, blocks, width), padded.unfold(1, 2 * width, width)
    qpos, kpos = pos[width:].view(blocks, width), pos.unfold(0, 2 * width, width)
    local = (qseg[..., :, None] == kseg[..., None, :]) & (kpos[None, :, None, :] <= qpos[None, :, :, None])
    prefix = max(plen)
    to_prompt = (torch.arange(prefix)[None, None] < torch.tensor(plen)[:, None, None]) & (seg[:, :, None] > 0)
    return dict(W=width, nb=blocks, L=length, P=prefix, has_prompt=(seg > 0)[:, None, :],
                local=additive(local, dtype).view(rows * blocks, 1, width, 2 * width),
                prompt=additive(to_prompt, dtype)[:, None])


def _blocks(x, pl):  # (U, h, L, d) -> (U * nb, h, W, d)
    rows, heads, length, dim = x.shape
    x = F.pad(x, (0, 0, 0, pl["nb"] * pl["W"] - length))
    return x.view(rows, heads, pl["nb"], pl["W"], dim).transpose(1, 2).reshape(-1, heads, pl["W"], dim)


def _unblocks(x, pl, rows):
    heads, dim = x.shape[1], x.shape[3]
    x = x.view(rows, pl["nb"], heads, pl["W"], dim).transpose(1, 2)
    return x.reshape(rows, heads, pl["nb"] * pl["W"], dim)[:, :, :pl["L"]]


def _windows(x, pl):  # (U, h, L, d) -> (U * nb, h, 2W, d): block b's keys are blocks b-1 and b
    rows, heads, length, dim = x.shape
    w, nb = pl["W"], pl["nb"]
    blocks = F.pad(x, (0, 0, w, nb * w - length)).view(rows, heads, nb + 1, w, dim)
    return torch.cat([blocks[:, :, :-1], blocks[:, :, 1:]], 3).transpose(1, 2).reshape(-1, heads, 2 * w, dim)


def _unwindows(g, pl, rows):
    w, nb = pl["W"], pl["nb"]
    heads, dim = g.shape[1], g.shape[3]
    g = g.view(rows, nb, heads, 2 * w, dim).transpose(1, 2)
    out = g.new_zeros(rows, heads, nb + 1, w, dim)
    out[:, :, :-1] += g[..., :w, :]
    out[:, :, 1:] += g[..., w:, :]
    return out.reshape(rows, heads, (nb + 1) * w, dim)[:, :, w:w + pl["L"]]


class SplitAttention(torch.autograd.Function):
    """Queries (U, h, L, d), keys and values with as many heads; ``pl`` from :func:`split_plan`."""

    @staticmethod
    def forward(ctx, q, k, v, pl):
        rows, prefix = q.shape[0], pl["P"]
        out_p, lse_p = FWD(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, attn_mask=pl["prompt"])[:2]
        out_b, lse_b = FWD(_blocks(q, pl), _windows(k, pl), _windows(v, pl), 0.0, False, attn_mask=pl["local"])[:2]
        out_l, lse_l = _unblocks(out_b, pl, rows), _unblocks(lse_b[..., None], pl, rows)[..., 0]
        lse_p = torch.where(pl["has_prompt"], lse_p, float("-inf"))  # the kernel gives 0 for a fully masked row
        lse = torch.logaddexp(lse_p, lse_l)
        out = out_p * torch.exp(lse_p - lse)[..., None] + out_l * torch.exp(lse_l - lse)[..., None]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pl = pl
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        pl, rows, prefix = ctx.pl, q.shape[0], ctx.pl["P"]
        grad = grad.contiguous()
        dq, dk_p, dv_p = BWD(grad, q, k[:, :, :prefix], v[:, :, :prefix], out, lse, 0.0, False,
                             attn_mask=pl["prompt"])
        dq_b, dk_b, dv_b = BWD(_blocks(grad, pl), _blocks(q, pl), _windows(k, pl), _windows(v, pl),
                               _blocks(out, pl), _blocks(lse[..., None], pl)[..., 0], 0.0, False,
                               attn_mask=pl["local"])
        dk, dv = _unwindows(dk_b, pl, rows), _unwindows(dv_b, pl, rows)
        dk[:, :, :prefix] += dk_p
        dv[:, :, :prefix] += dv_p
        return dq + _unblocks(dq_b, pl, rows), dk, dv, None


def variants(seg, plen, heads, kv_heads, dim, dtype, seed=0):
    torch.manual_seed(seed)
    rows, length = seg.shape
    q = torch.randn(rows, heads, length, dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(rows, kv_heads, length, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)) & causal)[:, None]
    pl = split_plan(seg, plen, dtype)
    group = heads // kv_heads

    def dense():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)

    def split():
        return SplitAttention.apply(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), pl)

    grad = torch.randn(rows, heads, length, dim, dtype=dtype) * (seg >= 0)[:, None, :, None]
    # pairs the kernels compute (per head): every pair of a dense row; the split's windows and prompt products
    pairs = {"dense": rows * length * length, "split": rows * (pl["nb"] * pl["W"] * 2 * pl["W"] + length * pl["P"])}
    return {"dense": dense, "split": split}, (q, k, v), grad, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--completions", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    seg, plen = packed_rows(args.prompts, args.completions)
    fs, inputs, grad, _ = variants(seg, plen, 4, 2, 32, torch.float64)
    real = (seg >= 0)[:, None, :, None]
    ref_out, ref_grads = fs["dense"]() * real, torch.autograd.grad(fs["dense"](), inputs, grad)
    split_out, split_grads = fs["split"]() * real, torch.autograd.grad(fs["split"](), inputs, grad)
    err = max([(ref_out - split_out).abs().max().item()] +
              [(a - b).abs().max().item() for a, b in zip(ref_grads, split_grads)])
    fs, inputs, grad, pairs = variants(seg, plen, 4, 2, 32, torch.float32)
    print(f"{args.prompts} packed rows of {seg.shape[1]} positions; float64 max |split - dense| {err:.1e}")
    print("| variant | fwd+bwd ms per layer | flash kernels ms | pairs computed |")
    print("|---|---|---|---|")
    for name, f in fs.items():
        for _ in range(5):
            torch.autograd.grad(f(), inputs, grad)
        start = time.perf_counter()
        for _ in range(args.repeats):
            torch.autograd.grad(f(), inputs, grad)
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        with torch.profiler.profile() as prof:
            for _ in range(args.repeats):
                torch.autograd.grad(f(), inputs, grad)
        kernel = sum(e.self_cpu_time_total for e in prof.key_averages() if "flash_attention" in e.key)
        print(f"| {name} | {ms:.2f} | {kernel / args.repeats / 1e3:.2f} | {pairs[name]:,} |")


if __name__ == "__main__":
    main()
