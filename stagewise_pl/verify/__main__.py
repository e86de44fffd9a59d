"""Grade a JSONL file: ``python -m stagewise_pl.verify IN.jsonl [--verifier math] [--out OUT.jsonl]``.

Each row needs ``completion`` and ``answer`` (``problem`` is carried along, never graded). Rows are
graded in parallel in the bounded grading pool, written back with ``reward`` and ``reason``, and the
counts per reason are printed. A row that is not JSON or lacks a field is written with
``reason: "bad_row"`` and counted, never dropped silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from stagewise_pl.verify.base import VERIFIERS


def read_rows(path: Path) -> list[tuple[int, dict, str]]:
    """(line, row, problem) for each non-blank line; problem is '' for a good row, else why it is bad."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append((number, {"raw": text.rstrip("\r\n")}, f"invalid JSON: {exc.msg}"))
                continue
            if not isinstance(row, dict):
                rows.append((number, {"raw": row}, "not an object"))
            elif not isinstance(row.get("completion"), str) or row.get("answer") is None:
                rows.append((number, row, "needs 'completion' (text) and 'answer'"))
            else:
                rows.append((number, row, ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise_pl.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="JSONL rows with 'completion' and 'answer'")
    parser.add_argument("--verifier", default="math", help=f"registered ({', '.join(VERIFIERS.names())}) or dotted path")
    parser.add_argument("--out", type=Path, help="output JSONL (default: IN.graded.jsonl)")
    parser.add_argument("--workers", type=int, default=2, help="grading processes (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per completion before 'timeout'")
    parser.add_argument("--after-think", action="store_true", help="grade only the text after </think>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"no such file: {args.input}")
    out = args.out or args.input.with_suffix(".graded.jsonl")

    from stagewise_pl.verify.pool import GradingPool

    rows = read_rows(args.input)
    good = [(n, r) for n, r, problem in rows if not problem]
    with GradingPool(args.verifier, {"after_think": args.after_think}, workers=args.workers,
                     timeout_s=args.timeout) as pool:
        verdicts = pool.score_batch([r["completion"] for _, r in good], [str(r["answer"]) for _, r in good],
                                    progress=not args.no_progress, desc=f"grading {args.input.name}")
    by_line = {n: v for (n, _), v in zip(good, verdicts)}
    counts: Counter = Counter()
    with open(out, "w") as handle:
        for number, row, problem in rows:
            if problem:
                row.update(reward=0.0, reason="bad_row", error=f"{args.input}:{number}: {problem}")
            else:
                row.update(reward=by_line[number].reward, reason=by_line[number].reason)
            counts[row["reason"]] += 1
            handle.write(json.dumps(row) + "\n")
    print(f"graded {len(rows)} rows of {args.input} with {args.verifier!r} -> {out}")
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:16s} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
