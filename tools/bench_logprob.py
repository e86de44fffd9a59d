"""Log-prob memory and time: ours beside the naive path, a TRL-style selective_log_softmax and Liger.

Two shapes (float32, hidden 896, vocabulary 151 936 -- Qwen2.5's):
- forward of 16 384 tokens: per-token log-probs of the chosen tokens (no gradient);
- forward + backward of 2 048 tokens (2 sequences of 1 024): the GRPO clipped surrogate,
  token-mean, gradients to hidden and LM-head weight.

Variants: naive (logits, log_softmax, gather); trl-style (logits, then a log-sum-exp per sequence
and a gather, written here from the idea of TRL's selective_log_softmax); liger (Liger-Kernel's
pure-torch chunked selective log-prob, when liger-kernel is installed); ours
(``stagewise_pl.kernels.logprobs`` and ``fused_policy_loss``). Every run is a fresh process
(peak RSS is its own, inputs included), runs are interleaved, medians of ``--repeats`` reported.

    python tools/bench_logprob.py [--repeats 3] [--shapes fwd,fwdbwd] [--json PATH]

--json writes every figure with a top-level "goal_ratio": the worst of ours-over-naive time
ratios against their goals (forward: time <= 0.8x naive; forward+backward: <= 1.0x naive),
normalised so that <= 1.0 meets every time goal; memory goals are listed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchlib import peak_rss_mb, report, run_child

H, V = 896, 151_936
SHAPES = {"fwd": 16_384, "fwdbwd": 2_048}
GOALS = {"fwd": {"time_vs_naive": 0.8, "peak_rss_gb": 1.3}, "fwdbwd": {"time_vs_naive": 1.0, "peak_rss_gb": 1.6}}
VARIANTS = ["naive", "trl-style", "liger", "ours"]


def liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction  # noqa: F401
    except ImportError:
        return False
    return True


def make_inputs(n: int, grad: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).mul_(0.05)  # in place: no second copy in the peak RSS
    weight = torch.randn(V, H, generator=g).mul_(0.05)
    targets = torch.randint(0, V, (n,), generator=g)
    if grad:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    return hidden, weight, targets


def selected_logprobs(variant: str, hidden, weight, targets):
    import torch

    if variant == "naive":
        logits = hidden @ weight.T  # (N, V)
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    if variant == "trl-style":  # full logits, then one log-sum-exp per sequence (rows of 1 024 tokens)
        logits = (hidden @ weight.T).view(-1, 1024, weight.shape[0])
        selected = logits.gather(-1, targets.view(-1, 1024)[..., None])[..., 0]
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return (selected - lse).view(-1)
    if variant == "liger":
        from liger_kernel.chunked_loss.fused_linear_ppo import (_SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE,
                                                                _ChunkedSelectiveLogProbFunction)

        return _ChunkedSelectiveLogProbFunction.apply(hidden, weight, targets, None, 1.0,
                                                      _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE)
    from stagewise_pl.kernels import logprobs

    return logprobs(hidden, weight, targets, backend="torch")[0]


def child(variant: str, shape: str) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    n = SHAPES[shape]
    hidden, weight, targets = make_inputs(n, grad=shape == "fwdbwd")
    if shape == "fwd":
        started = time.perf_counter()
        with torch.no_grad():
            logp = selected_logprobs(variant, hidden, weight, targets)
        seconds = time.perf_counter() - started
        check = float(logp.double().sum())
    else:
        from stagewise_pl.losses import PolicyLossConfig, policy_loss

        cfg = PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.28, aggregation="token_mean")
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(2, n // 2)
        advantages = torch.randn(2, generator=g)
        with torch.no_grad():  # old log-probs near the current ones
            old = torch.full((2, n // 2), -11.93) + 0.1 * torch.randn(2, n // 2, generator=g)
        started = time.perf_counter()
        if variant == "ours":
            from stagewise_pl.kernels import fused_policy_loss

            loss = fused_policy_loss(hidden.view(2, n // 2, H), weight, targets.view(2, n // 2), old, advantages, mask,
                                     cfg, backend="torch").loss
        else:
            logp = selected_logprobs(variant, hidden, weight, targets).view(2, n // 2)
            loss = policy_loss(logp, old, advantages, mask, cfg)
        loss.backward()
        seconds = time.perf_counter() - started
        # norms, not abs().sum(): a [V x H] temporary here would count in every variant's peak RSS
        norm = torch.linalg.vector_norm
        check = float(loss) + float(norm(hidden.grad)) + float(norm(weight.grad))
    return {"seconds": seconds, "peak_rss_gb": peak_rss_mb() / 1024,
            "check": check}  # GB: the forward shape's inputs alone are 0.58 GB


def measure(variant: str, shape: str) -> dict:
    return run_child(__file__, ["--child", variant, "--shape", shape])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="fwd,fwdbwd")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report(child(args.child, args.shape))
        return
    variants = [v for v in args.variants.split(",") if v != "liger" or liger_available()]
    summary: dict = {"shapes": {}, "hidden": H, "vocab": V, "threads": int(os.environ.get("BENCH_THREADS", "2"))}
    worst = 0.0
    for shape in args.shapes.split(","):
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants:
                runs[v].append(measure(v, shape))
                print(f"{shape} repeat {r + 1} {v}: {runs[v][-1]}", file=sys.stderr)
        naive_s = statistics.median(x["seconds"] for x in runs["naive"])
        rows = {}
        for v, rs in runs.items():
            sec, rss = statistics.median(x["seconds"] for x in rs), statistics.median(x["peak_rss_gb"] for x in rs)
            rows[v] = {"seconds": sec, "peak_rss_gb": rss, "time_vs_naive": sec / naive_s, "runs": rs}
        goal = GOALS[shape]
        ours = rows["ours"]
        rows["ours"]["meets_time_goal"] = ours["time_vs_naive"] <= goal["time_vs_naive"]
        rows["ours"]["meets_memory_goal"] = ours["peak_rss_gb"] <= goal["peak_rss_gb"]
        worst = max(worst, ours["time_vs_naive"] / goal["time_vs_naive"])
        summary["shapes"][shape] = {"tokens": SHAPES[shape], "goal": goal, "variants": rows}
        title = "forward" if shape == "fwd" else "forward + backward (GRPO loss)"
        print(f"\n{title}, {SHAPES[shape]} tokens, H={H}, V={V}, fp32, median of {args.repeats}\n")
        print("| variant | seconds | x naive | peak RSS GB |")
        print("|---|---|---|---|")
        for v, row in rows.items():
            print(f"| {v} | {row['seconds']:.1f} | {row['time_vs_naive']:.2f} | {row['peak_rss_gb']:.2f} |")
        print(f"goal for ours: time <= {goal['time_vs_naive']}x naive, peak RSS <= {goal['peak_rss_gb']} GB")
    summary["goal_ratio"] = worst
    print(f"\ngoal_ratio (worst of ours/naive time over its goal; <= 1 meets every time goal): {worst:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
