"""The fused log-prob kernel on CUDA beside the naive path (full logits, log_softmax, gather), in the same run:
forward + backward time and peak GPU memory of a GRPO-sized call (N tokens x H hidden, Qwen2.5's vocabulary).

    python tools/bench_cuda_logprob.py [--tokens 16384] [--hidden 1536] [--vocab 151936] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch


def run(variant: str, n: int, h: int, v: int, dtype: torch.dtype, repeats: int) -> dict:
    from stagewise_pl.kernels import logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    times = []
    for r in range(repeats + 1):  # the first call compiles (Triton) and warms up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if variant == "naive":
            logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None])[:, 0]
        else:
            logp, _ = logprobs(hidden, weight, targets, backend=variant)
        logp.sum().backward()
        end.record()
        torch.cuda.synchronize()
        if r:
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        hidden.grad = weight.grad = None
    return {"variant": variant, "ms": sorted(times)[len(times) // 2], "peak_extra_gib": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}: N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, "
          f"forward + backward, median of {args.repeats}")
    print("| variant | ms | peak extra GiB |\n|---|---|---|")
    for variant in ("naive", "torch", "triton"):
        r = run(variant, args.tokens, args.hidden, args.vocab, dtype, args.repeats)
        print(f"| {r['variant']} | {r['ms']:.2f} | {r['peak_extra_gib']} |", flush=True)


if __name__ == "__main__":
    main()
