"""The machine's matrix-product peaks in float32 and bfloat16: the limit every other bench is read against.

One ``torch.mm`` at a time, at the shapes the real model's work has (SmolLM2-135M: hidden 576, MLP 1 536, vocabulary
49 152) and one large square product, in each dtype; the best of ``--repeats`` timings of a loop lasting about
``--seconds``. GFLOP/s = 2 m k n / seconds. bfloat16 products take bfloat16 inputs and write bfloat16 (what a
bfloat16 model's ``F.linear`` does); oneDNN uses the CPU's AVX-512 BF16 or AMX instructions where it has them.

    python tools/bench_peak.py [--threads 2] [--repeats 5] [--seconds 0.5] [--json PATH]

Also importable: ``peaks()`` returns the table's rows (other benches print a row of it beside their figures).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# (name, m, k, n): m rows times a (k, n) weight
SHAPES = [
    ("decode step, MLP up (128 x 576 x 1536)", 128, 576, 1536),
    ("decode step, vocabulary head (128 x 576 x 49152)", 128, 576, 49152),
    ("training micro-batch, MLP up (2048 x 576 x 1536)", 2048, 576, 1536),
    ("square (2048 x 2048 x 2048)", 2048, 2048, 2048),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The CPU's bfloat16-related instruction sets (Linux only)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return [f for f in flags if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    except OSError:
        pass
    return []


def gflops(m: int, k: int, n: int, dtype, repeats: int, seconds: float) -> float:
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up (oneDNN builds its kernel on the first call)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    one = max(time.perf_counter() - start, 1e-6)
    loops = max(1, int(seconds / one))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - start) / loops)
    return 2 * m * k * n / best / 1e9


def peaks(threads: int = 2, repeats: int = 5, seconds: float = 0.5) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    rows = []
    for name, m, k, n in SHAPES:
        f32 = gflops(m, k, n, torch.float32, repeats, seconds)
        bf16 = gflops(m, k, n, torch.bfloat16, repeats, seconds)
        rows.append({"shape": name, "m": m, "k": k, "n": n, "float32_gflops": round(f32, 1),
                     "bfloat16_gflops": round(bf16, 1), "ratio": round(bf16 / f32, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import torch

    rows = peaks(args.threads, args.repeats, args.seconds)
    print(f"{cpu_name()}; {args.threads} threads; torch {torch.__version__}; flags: {' '.join(cpu_flags()) or '-'}")
    print(f"{'product':52s} {'float32':>10s} {'bfloat16':>10s} {'bf16/fp32':>10s}   (GFLOP/s, best of "
          f"{args.repeats})")
    for row in rows:
        print(f"{row['shape']:52s} {row['float32_gflops']:10.1f} {row['bfloat16_gflops']:10.1f} {row['ratio']:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "flags": cpu_flags(), "threads": args.threads,
                                         "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
