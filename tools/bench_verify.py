"""Grading throughput: the bounded grading pool (1 and 2 workers) beside math-verify called directly.

Work: 10 000 (completion, gold) pairs -- gold solutions of the shared benchmarks (MATH-500, GSM8K,
Minerva) graded against their own answer and against another row's answer, cycled to the count.
Without the shared data, synthetic arithmetic completions are used instead.

- direct: ``math_verify.parse`` + ``verify`` in this process, one pair after another (its own
  SIGALRM timeouts on, as math-verify is meant to be called on a main thread);
- pool-1, pool-2: ``GradingPool("math")`` with 1 and 2 worker processes, ``score_batch``.

Variants run interleaved (direct, pool-1, pool-2, direct, ...); the median of the repeats is
reported. Pool start-up is excluded (it happens once per run), pipe round trips are included.

    python tools/bench_verify.py [--n 10000] [--repeats 1] [--json PATH]

--json writes the figures with a top-level "goal_ratio": pool-2's seconds over direct's (the
issue sets no numeric goal; lower is better).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def workload(n: int) -> tuple[list[str], list[str], str]:
    from stagewise_pl.data.loaders import load_benchmark

    pairs: list[tuple[str, str]] = []
    if SHARED.is_dir():
        for stem in ("math500", "gsm8k_test", "minerva_math"):
            problems, _ = load_benchmark(SHARED / f"{stem}.jsonl")
            for i, p in enumerate(problems):
                pairs.append((p.solution or "", p.answer))
                pairs.append((p.solution or "", problems[(i + 1) % len(problems)].answer))
        source = "MATH-500, GSM8K test, Minerva solutions (own and other rows' answers)"
    else:
        from stagewise_pl.config import load_config
        from stagewise_pl.tasks.arithmetic import ArithmeticTask

        task = ArithmeticTask.from_config(load_config("default").task)
        for p in task.split("train")[: n // 2]:
            pairs += [(p.teacher_traces[0].replace("#### ", "\\boxed{") + "}", p.answer), (p.teacher_traces[0], "0")]
        source = "synthetic arithmetic traces (shared benchmarks not found)"
    pairs = (pairs * (n // max(1, len(pairs)) + 1))[:n]
    return [c for c, _ in pairs], [g for _, g in pairs], source


def run_direct(completions, golds) -> tuple[float, int]:
    from math_verify import parse, verify

    started, correct = time.perf_counter(), 0
    for completion, gold in zip(completions, golds):
        correct += bool(verify(parse(f"${gold}$"), parse(completion)))
    return time.perf_counter() - started, correct


def run_pool(workers: int, completions, golds) -> tuple[float, int]:
    from stagewise_pl.verify.pool import GradingPool

    with GradingPool("math", workers=workers, timeout_s=5.0) as pool:
        started = time.perf_counter()
        verdicts = pool.score_batch(completions, golds)
        return time.perf_counter() - started, sum(v.reason == "correct" for v in verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    completions, golds, source = workload(args.n)
    variants = {"direct (math-verify, 1 process)": lambda: run_direct(completions, golds),
                "pool-1 (1 worker)": lambda: run_pool(1, completions, golds),
                "pool-2 (2 workers)": lambda: run_pool(2, completions, golds)}
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
    table = {name: {"seconds": statistics.median(s for s, _ in r), "correct": r[0][1]} for name, r in runs.items()}
    print(f"\n{args.n} completions: {source}; median of {args.repeats}\n")
    print("| variant | completions/s | seconds | judged correct |")
    print("|---|---|---|---|")
    for name, row in table.items():
        row["completions_per_s"] = args.n / row["seconds"]
        print(f"| {name} | {row['completions_per_s']:.0f} | {row['seconds']:.1f} | {row['correct']} |")
    direct = table["direct (math-verify, 1 process)"]["seconds"]
    goal_ratio = table["pool-2 (2 workers)"]["seconds"] / direct
    print(f"\ngoal_ratio (pool-2 seconds over direct, lower is better): {goal_ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"goal_ratio": goal_ratio, "peer": "math-verify direct", "n": args.n,
                                         "source": source, "variants": table}, indent=1))


if __name__ == "__main__":
    main()
