"""The difficulty ledger at GPU scale: what every phase asks of it, timed and its peak memory measured, at 0.1M, 1M
and 10M rollouts, beside the naive path (the whole ledger read into Python rows, as the ledger did before it read
incrementally and by column) measured in the same run.

The synthetic ledger has the schema a real run writes and the shape of conf/qwen1.5b.yaml's plan on GSM8K's
7 473 training problems: rounds of a profile (k = 8 samples of every problem, 256 problems per part) then a GRPO
phase (32 prompts x 8 rollouts per part, 200 steps), repeated until the row count is reached. Completions are drawn
from a pool of 4 096 texts of 200-600 characters (so the completion column compresses better than a real run's).
The writer's index segments (stagewise_pl.ledger_index) are made once after the build, as a run leaves them.

What is measured, each in a fresh process (a resumed run or the report opens the ledger cold):
  route     pass rates of the last profile (every routing rule that reads profiles)
  evidence  a sequential profile's evidence: the tally of one chunk of problems since the last profile, and of the
            last profile (stagewise_pl.phases.profile)
  budget    tokens by phase (the token budget, the run summary)
  cft       the failed rollouts of the last GRPO phase by problem (critique fine-tuning's input)
  report    the report's ledger table, buckets and flows between profiles (stagewise_pl.report.ledger_stats); its
            size is phases + flows, the naive one's pass rates + phases (the two count differently)
  append    after a first query, one more part recorded and the query again: the second query's time (a phase's
            step loop)

    python tools/bench_ledger.py [--rows 100000 1000000 10000000] [--naive-max 1000000] [--ops ...] [--dir D]
                                 [--json PATH]

The naive path is run up to --naive-max rows (above it its rows say "not run"); run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import report, run_child  # noqa: E402

PROBLEMS, K, CHUNK, PROMPTS, GENERATIONS, GRPO_STEPS = 7473, 8, 256, 32, 8, 200
OPS = ("route", "evidence", "budget", "cft", "report", "append")


# ------------------------------------------------------------------ the synthetic ledger
def build(directory: Path, rows: int, seed: int = 0) -> dict:
    """Write a ledger of ``rows`` rollouts under ``directory``/ledger; returns its plan (phase names, parts)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stagewise_pl.ledger import SCHEMA

    rng = np.random.default_rng(seed)
    ids = pa.array([f"gsm8k_train-{i}" for i in range(PROBLEMS)])
    texts = pa.array(["".join(f"step {j}: {rng.integers(100)} + {rng.integers(100)} = {rng.integers(200)}\n"
                              for j in range(int(rng.integers(10, 30)))) for _ in range(4096)])
    skill = rng.beta(0.6, 0.9, PROBLEMS)  # per-problem pass probability: many hard, some easy
    ledger = directory / "ledger"
    ledger.mkdir(parents=True)
    written, part, phases, index, step = 0, 0, [], 0, 0

    def write(phase: str, kind: str, problem_idx, sample_idx, round_: int) -> None:
        nonlocal written, part, step
        n = len(problem_idx)
        correct = rng.random(n) < skill[problem_idx]
        table = pa.table({
            "run_id": pa.array(["bench"] * n), "phase": pa.array([phase] * n),
            "phase_index": pa.array(np.full(n, index, np.int32)), "phase_kind": pa.array([kind] * n),
            "step": pa.array(np.full(n, step, np.int64)), "global_step": pa.array(np.full(n, step, np.int64)),
            "problem_id": ids.take(pa.array(problem_idx)), "sample_index": pa.array(sample_idx.astype(np.int32)),
            "reward": pa.array(correct.astype(np.float64)),
            "reason": pa.array(np.where(correct, "correct", "wrong_answer")),
            "completion_tokens": pa.array(rng.integers(40, 400, n).astype(np.int32)),
            "truncated": pa.array(rng.random(n) < 0.02), "zero_group": pa.array(np.zeros(n, bool)),
            "completion": texts.take(pa.array(rng.integers(0, len(texts), n))),
            "round": pa.array(np.full(n, round_, np.int32))}, schema=SCHEMA)
        pq.write_table(table, ledger / f"part-{part:06d}.parquet")
        written, part = written + n, part + 1

    r = 0
    while written < rows:
        profile = f"{2 * r + 1}-profile"
        phases.append({"name": profile, "kind": "profile", "index": index})
        for start in range(0, PROBLEMS, CHUNK):
            chunk = np.arange(start, min(start + CHUNK, PROBLEMS))
            write(profile, "profile", np.repeat(chunk, K), np.tile(np.arange(K), len(chunk)), 0)
            if written >= rows:
                break
        index += 1
        if written >= rows:  # a phase enters the plan only with rows of its own
            break
        grpo = f"{2 * r + 2}-grpo"
        phases.append({"name": grpo, "kind": "grpo", "index": index})
        for _ in range(GRPO_STEPS):
            if written >= rows:
                break
            prompts = rng.choice(PROBLEMS, PROMPTS, replace=False)
            write(grpo, "grpo", np.repeat(prompts, GENERATIONS), np.tile(np.arange(GENERATIONS), PROMPTS), 0)
            step += 1
        index, r = index + 1, r + 1
    from stagewise_pl.ledger import DifficultyLedger

    DifficultyLedger(ledger, "bench").tokens_by_phase()  # the writer's index segments, as a run leaves them
    plan = {"rows": written, "parts": part, "phases": phases}
    (directory / "plan.json").write_text(json.dumps(plan))
    return plan


# ------------------------------------------------------------------ the naive path: every row into Python
class NaiveLedger:
    """The ledger's queries as it answered them before: every column of every part read, rows as Python dicts."""

    def __init__(self, directory: Path):
        self.dir = directory

    def rows(self, columns: list[str]) -> list[dict]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = sorted(self.dir.glob("part-*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts]).select(columns).to_pylist()

    def pass_rates(self, phase: str) -> dict:
        counts: "OrderedDict[str, list[int]]" = OrderedDict()
        for row in self.rows(["phase", "problem_id", "reason"]):
            if row["phase"] == phase:
                c = counts.setdefault(row["problem_id"], [0, 0])
                c[0] += row["reason"] == "correct"
                c[1] += 1
        return OrderedDict((pid, ok / n) for pid, (ok, n) in counts.items())

    def tally(self, problems, phases=None, first_index: int = 0, last_index=None) -> dict:
        wanted, out = None if problems is None else set(problems), {}
        for row in self.rows(["phase", "phase_index", "problem_id", "reason"]):
            if (wanted is not None and row["problem_id"] not in wanted) or (phases is not None
                                                                            and row["phase"] not in phases):
                continue
            if row["phase_index"] < first_index or (last_index is not None and row["phase_index"] > last_index):
                continue
            entry = out.setdefault(row["problem_id"], [0, 0, []])
            entry[0] += row["reason"] == "correct"
            entry[1] += 1
            if row["phase"] not in entry[2]:
                entry[2].append(row["phase"])
        return out

    def tokens_by_phase(self) -> dict:
        out: "OrderedDict[str, dict]" = OrderedDict()
        for row in self.rows(["phase", "completion_tokens"]):
            entry = out.setdefault(row["phase"], {"rollouts": 0, "tokens": 0})
            entry["rollouts"] += 1
            entry["tokens"] += int(row["completion_tokens"])
        return out

    def failures_by_problem(self, phase: str) -> dict:
        out: "OrderedDict[str, list[str]]" = OrderedDict()
        for row in self.rows(["phase", "problem_id", "reward", "completion"]):
            if row["phase"] == phase and row["reward"] <= 0 and row["completion"] is not None:
                out.setdefault(row["problem_id"], []).append(row["completion"])
        return out

    def report(self, profiles: list[str]) -> int:
        by_phase: "OrderedDict[str, list[dict]]" = OrderedDict()
        for r in self.rows(["phase", "phase_kind", "problem_id", "reason", "completion_tokens", "truncated"]):
            by_phase.setdefault(r["phase"], []).append(r)
        return sum(len(self.pass_rates(p)) for p in profiles[-2:]) + len(by_phase)


# ------------------------------------------------------------------ one measurement (in a child process)
def measure(directory: Path, path: str, op: str) -> dict:
    from stagewise_pl.ledger import DifficultyLedger
    from stagewise_pl.records import RolloutRecord

    plan = json.loads((directory / "plan.json").read_text())
    profiles = [p["name"] for p in plan["phases"] if p["kind"] == "profile"]
    grpos = [p for p in plan["phases"] if p["kind"] == "grpo"]
    last_profile = profiles[-1]
    ledger = (DifficultyLedger(directory / "ledger", "bench", writer=False) if path == "stagewise_pl"
              else NaiveLedger(directory / "ledger"))
    chunk = [f"gsm8k_train-{i}" for i in range(CHUNK)]
    since = next(p["index"] for p in plan["phases"] if p["name"] == last_profile)
    t0 = time.perf_counter()
    if op == "route":
        size = len(ledger.pass_rates(last_profile))
    elif op == "evidence":
        size = len(ledger.tally(chunk, first_index=since + 1)) + len(ledger.tally(None, {last_profile}))
    elif op == "budget":
        size = len(ledger.tokens_by_phase())
    elif op == "cft":
        size = sum(len(v) for v in ledger.failures_by_problem((grpos or plan["phases"])[-1]["name"]).values())
    elif op == "report":
        if path == "stagewise_pl":
            from stagewise_pl.report import ledger_stats

            stats = ledger_stats(directory, {p["name"]: {} for p in plan["phases"]})
            size = len(stats["ledger"]) + len(stats["flows"])  # phase rows and flows between profiles
        else:
            size = ledger.report(profiles)
    elif op == "append":
        ledger.pass_rates(last_profile)
        records = [RolloutRecord(phase="bench-grpo", phase_index=len(plan["phases"]), phase_kind="grpo", step=0,
                                 global_step=0, problem_id=chunk[i % CHUNK], sample_index=i % 8, reward=0.0,
                                 reason="wrong_answer", completion_tokens=10, truncated=False, zero_group=False,
                                 completion="x", round=0) for i in range(PROMPTS * GENERATIONS)]
        if path == "stagewise_pl":
            ledger.record(records)
        else:
            DifficultyLedger(directory / "ledger", "bench", writer=False).record(records)
        t0 = time.perf_counter()
        size = len(ledger.pass_rates(last_profile))
    seconds = time.perf_counter() - t0
    if op == "append":  # leave the ledger as built for the next measurement
        sorted((directory / "ledger").glob("part-*.parquet"))[-1].unlink()
    return {"seconds": seconds, "size": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--naive-max", type=int, default=1_000_000, help="largest ledger the naive path reads")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="what to measure (default: all)")
    parser.add_argument("--dir", type=Path, help="where the synthetic ledgers go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report(measure(Path(args.child[0]), args.child[1], args.child[2]))
        return 0
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    results = []
    try:
        for rows in args.rows:
            directory = root / f"rows-{rows}"
            shutil.rmtree(directory, ignore_errors=True)
            t0 = time.perf_counter()
            plan = build(directory, rows)
            disk = sum(p.stat().st_size for p in (directory / "ledger").iterdir()) / 2 ** 20
            print(f"{rows:,} rows: {plan['parts']} parts, {len(plan['phases'])} phases, {disk:.0f} MB on disk, "
                  f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for op in args.ops:
                for path in ("stagewise_pl", "naive"):
                    if path == "naive" and rows > args.naive_max:
                        results.append({"rows": rows, "op": op, "path": path, "seconds": None, "peak_rss_mb": None})
                        continue
                    r = run_child(__file__, ["--child", str(directory), path, op])
                    results.append({"rows": rows, "op": op, "path": path, **r})
                    print(f"  {op:8s} {path:12s} {r['seconds']:8.2f} s {r['peak_rss_mb']:8.0f} MB", file=sys.stderr)
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    for rows in args.rows:  # both paths must give the same answer (the report's differ in what they count)
        for op in [o for o in args.ops if o != "report"]:
            sizes = {r["path"]: r.get("size") for r in results if r["rows"] == rows and r["op"] == op}
            if sizes["stagewise_pl"] == 0:  # a query that finds nothing times nothing
                raise SystemExit(f"{rows} rows, {op}: the query answered no items, so its time measures nothing")
            if sizes.get("naive") is not None and sizes["naive"] != sizes["stagewise_pl"]:
                raise SystemExit(f"{rows} rows, {op}: stagewise_pl answered {sizes['stagewise_pl']} items, the "
                                 f"naive path {sizes['naive']}")
    print("| rows | what | stagewise_pl s | peak MB | naive s | peak MB | speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        for op in args.ops:
            ours, naive = (next(r for r in results if r["rows"] == rows and r["op"] == op and r["path"] == p)
                           for p in ("stagewise_pl", "naive"))
            if naive["seconds"] is None:
                tail = "not run | | "
            else:
                speedup = naive["seconds"] / ours["seconds"]
                tail = f"{naive['seconds']:.2f} | {naive['peak_rss_mb']:.0f} | {speedup:.0f}x"
            print(f"| {rows:,} | {op} | {ours['seconds']:.2f} | {ours['peak_rss_mb']:.0f} | {tail} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
