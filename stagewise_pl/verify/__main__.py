"""Grade a JSONL file: ``python -m stagewise_pl.verify IN.jsonl [--verifier math] [--out OUT.jsonl]``.

Each row needs ``completion`` and ``answer`` (``problem`` is carried along, never graded). Rows are
graded in parallel in the bounded grading pool, written back with ``reward`` and ``reason``, and the
counts per reason are printed. A row that is not JSON or lacks a field is written with
``reason: "bad_row"`` and counted, never dropped silently; each one is printed (file:line and why) and the exit
code is then 3.

Exit codes: 0 every row graded; 3 some rows were bad (the rest are graded and written); 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from stagewise_pl.verify.base import VERIFIERS

BAD_ROWS_EXIT = 3
SHOWN_BAD_ROWS = 20  # printed on the console; every one is in the output file


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
    parser = argparse.ArgumentParser(prog="python -m stagewise_pl.verify", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1].strip())
    parser.add_argument("input", type=Path, help="JSONL rows with 'completion' and 'answer'")
    parser.add_argument("--verifier", default="math",
                        help=f"registered ({', '.join(VERIFIERS.names())}) or dotted path")
    parser.add_argument("--out", type=Path, help="output JSONL (default: IN.graded.jsonl)")
    parser.add_argument("--workers", type=int, default=2, help="grading processes (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per grading try of a completion")
    parser.add_argument("--retries", type=int, default=1,
                        help="tries after a timed-out one, on a fresh process, before the verdict is 'timeout'")
    parser.add_argument("--after-think", action="store_true", help="grade only the text after </think>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"no such file: {args.input}")
    if args.timeout <= 0 or args.retries < 0 or args.workers < 1:
        parser.error("--timeout must be > 0, --retries >= 0 and --workers >= 1")
    out = args.out or args.input.with_suffix(".graded.jsonl")

    from stagewise_pl.verify.pool import GradingPool

    rows = read_rows(args.input)
    good = [(n, r) for n, r, problem in rows if not problem]
    with GradingPool(args.verifier, {"after_think": args.after_think}, workers=args.workers,
                     timeout_s=args.timeout, retries=args.retries) as pool:
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
    bad = [(number, problem) for number, _, problem in rows if problem]
    if not bad:
        return 0
    print(f"{len(bad)} bad row(s), written with reason 'bad_row' and not graded:", file=sys.stderr)
    for number, problem in bad[:SHOWN_BAD_ROWS]:
        print(f"  {args.input}:{number}: {problem}", file=sys.stderr)
    if len(bad) > SHOWN_BAD_ROWS:
        print(f"  ... and {len(bad) - SHOWN_BAD_ROWS} more (each row's 'error' in {out})", file=sys.stderr)
    return BAD_ROWS_EXIT


if __name__ == "__main__":
    sys.exit(main())
