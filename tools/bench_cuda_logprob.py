"""The fused losses on CUDA beside the naive path and Liger's fused linear cross-entropy, in the same run:
forward and forward + backward time and peak memory above the inputs, at GRPO-sized calls (N tokens x H hidden,
Qwen2.5's vocabulary), with the chunk plan each N gets printed.

    python tools/bench_cuda_logprob.py [--tokens 4096 16384] [--hidden 1536] [--vocab 151936] [--dtype bfloat16]
    python tools/bench_cuda_logprob.py --device cpu --tokens 300 --hidden 64 --vocab 1031   # a smoke run, no GPU

Rows: the SFT loss (mean NLL) -- naive (logits in the input dtype, float32 cross-entropy), ours
(``fused_nll_loss`` with the Triton row ops, and with the torch ones), Liger's ``LigerFusedLinearCrossEntropyLoss``
where ``liger_kernel`` imports -- and the GRPO surrogate -- naive (logits, float32 log-softmax, gather,
``losses.policy_loss``) and ours (``fused_policy_loss``). "forward" is the call under ``torch.no_grad()``; ours
computes its gradients during the forward pass whenever its inputs require them, so its forward-only time is that
of the same call on inputs that do not.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Optional

import torch


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h, device=device, generator=g) * 0.05).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, generator=g) * 0.05).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    advantages = torch.randn(n, device=device, generator=g)
    return hidden, weight, targets, advantages


def variants(liger: Optional[Callable]) -> dict[str, Callable]:
    from stagewise_pl.kernels import fused_nll_loss, fused_policy_loss
    from stagewise_pl.losses import PolicyLossConfig, policy_loss

    cfg = PolicyLossConfig()

    def naive_nll(hidden, weight, targets, adv):
        return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets)

    def naive_policy(hidden, weight, targets, adv):
        logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None])[:, 0]
        mask = torch.ones_like(logp)
        return policy_loss(logp[None], logp.detach()[None], adv[None], mask[None], cfg)  # on-policy, as ours

    def ours_policy(backend):
        def call(hidden, weight, targets, adv):
            mask = torch.ones(1, targets.shape[0], device=targets.device)
            return fused_policy_loss(hidden[None], weight, targets[None], None, adv[None], mask, cfg,
                                     backend=backend).loss
        return call

    rows = {"SFT naive (logits, cross_entropy)": naive_nll,
            "SFT ours, Triton row ops": lambda h, w, t, a: fused_nll_loss(h, w, t, backend="triton")[0],
            "SFT ours, torch row ops": lambda h, w, t, a: fused_nll_loss(h, w, t, backend="torch")[0]}
    if liger is not None:
        rows["SFT Liger fused linear cross-entropy"] = lambda h, w, t, a: liger(w, h, t)
    rows.update({"GRPO naive (logits, log_softmax, policy_loss)": naive_policy,
                 "GRPO ours, Triton row ops": ours_policy("triton"), "GRPO ours, torch row ops": ours_policy("torch")})
    return rows


def measure(call: Callable, inputs, backward: bool, repeats: int, device: str) -> dict:
    hidden, weight, targets, adv = inputs
    cuda = device == "cuda"
    times, peak = [], 0.0
    for r in range(repeats + 1):  # the first call compiles (Triton) and warms up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        if backward:
            call(hidden, weight, targets, adv).backward()
        else:
            with torch.no_grad():
                call(hidden.detach(), weight.detach(), targets, adv)
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**30)
        if r:
            times.append((time.perf_counter() - start) * 1000)
        hidden.grad = weight.grad = None
    return {"ms": sorted(times)[len(times) // 2], "peak_extra_gib": round(peak, 2) if cuda else None}


def load_liger() -> tuple[Optional[Callable], str]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        return None, f"Liger not measured: {exc}"
    import importlib.metadata

    return LigerFusedLinearCrossEntropyLoss(), f"liger-kernel {importlib.metadata.version('liger-kernel')}"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from stagewise_pl.kernels import choose_plan
    from stagewise_pl.kernels.plan import naive_extra_bytes, plan_extra_bytes

    dtype, device = getattr(torch, args.dtype), args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a smoke run")
    liger, liger_note = load_liger()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: H={args.hidden} V={args.vocab} {args.dtype}, median of "
          f"{args.repeats} after a warm-up call; {liger_note}")
    results = []
    for n in args.tokens:
        inputs = make_inputs(n, args.hidden, args.vocab, dtype, device)
        p = choose_plan(inputs[0], inputs[1])
        model = plan_extra_bytes(p, n, args.hidden, args.vocab, dtype) / 2**30
        goal = naive_extra_bytes(n, args.vocab, dtype) / 8 / 2**30
        print(f"\nN={n}: plan {p.chunk_tokens} tokens x {p.vocab_block} vocabulary rows per chunk "
              f"({-(-n // p.chunk_tokens)} chunks), products in {p.matmul_dtype or 'float32'}, weight gradient "
              f"accumulated in {p.grad_w_dtype or 'float32'}; modelled extra "
              f"{model:.2f} GiB, goal {goal:.2f} GiB (one eighth of the naive path's, modelled)")
        print("| variant | forward ms | forward + backward ms | peak extra GiB (fwd+bwd) |\n|---|---|---|---|")
        for label, call in variants(liger).items():
            try:
                fwd = measure(call, inputs, False, args.repeats, device)
                both = measure(call, inputs, True, args.repeats, device)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # one variant's failure is a row, not the end
                print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:120]} | | |", flush=True)
                results.append({"tokens": n, "variant": label, "error": str(exc)[:500]})
                continue
            row = {"tokens": n, "variant": label, "forward_ms": fwd["ms"], "ms": both["ms"],
                   "peak_extra_gib": both["peak_extra_gib"], "chunk_tokens": p.chunk_tokens}
            results.append(row)
            print(f"| {label} | {fwd['ms']:.2f} | {both['ms']:.2f} | {both['peak_extra_gib']} |", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
