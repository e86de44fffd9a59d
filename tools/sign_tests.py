"""Every arm of an experiment against one of them, problem by problem: the table at the top of docs/RESULTS.md.

    python tools/sign_tests.py /work/runs/rivals --against method [--arms rl,hpt] [--benchmark synthetic-test]

For each arm with finished runs: held-out greedy pass@1 after its last phase (mean ± std over its seeds), and a
two-sided exact sign test against the ``--against`` arm on the held-out problems, paired by seed and problem: b =
(seed, problem) pairs this arm got right and the reference wrong, c = the reverse; p = P(a split at least as
uneven as b:c | each discordant pair a fair coin). Seeds are paired only where both arms have them. Also per arm:
generated tokens, teacher texts and optimizer steps (means over seeds, from the runs' phase summaries) and the
phases' wall time in minutes. A ``base`` row is the held-out result before training (``eval/before.json``) of the
reference arm's runs. Nothing is re-run: the figures come from the files each run wrote.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from stagewise_pl.experiment.results import cell, read_run


def sign_test(b: int, c: int) -> float:
    """Two-sided exact binomial sign test on b successes out of b + c at 1/2 (1.0 when there are no discordant)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def final_eval(run: Path, benchmark: str, label: str = "") -> dict:
    """Problem id -> greedy correct (bool) after the run's last phase (or after ``label``)."""
    state = json.loads((run / "state.json").read_text())
    label = label or list(state["completed"])[-1]
    results = json.loads((run / "eval" / f"{label}.json").read_text())
    name = benchmark or next(iter(results))
    return {pid: bool(v[0]) for pid, v in results[name]["problems"].items()}


def runs_of(arm_dir: Path) -> dict[int, Path]:
    """Seed -> run directory of the arm's finished runs."""
    out = {}
    for d in sorted(arm_dir.glob("seed-*")):
        run = read_run(d)
        if run and run["finished"]:
            out[int(d.name.split("-")[1])] = d
    return out


def compare(root: Path, against: str, arms: list[str], benchmark: str = "") -> list[dict]:
    reference = runs_of(root / against)
    if not reference:
        raise SystemExit(f"{root / against}: no finished runs of the reference arm")
    ref_evals = {s: final_eval(r, benchmark) for s, r in reference.items()}
    rows = []
    base = {s: final_eval(r, benchmark, "before") for s, r in reference.items() if (r / "eval/before.json").is_file()}
    if base:
        rows.append(row("base", base, ref_evals, {}))
    for arm in arms:
        runs = runs_of(root / arm)
        if runs:
            rows.append(row(arm, {s: final_eval(r, benchmark) for s, r in runs.items()}, ref_evals,
                            {s: read_run(r) for s, r in runs.items()}))
    return rows


def row(name: str, evals: dict, ref_evals: dict, costs: dict) -> dict:
    b = c = 0
    for seed, got in evals.items():
        ref = ref_evals.get(seed)
        if ref is None:
            continue
        for pid, ok in got.items():
            if pid in ref and ok != ref[pid]:
                b, c = b + ok, c + (not ok)
    accuracy = [sum(e.values()) / len(e) for e in evals.values()]

    def avg(key):
        return sum(v[key] for v in costs.values()) / len(costs) if costs else None

    return {"arm": name, "seeds": sorted(evals), "pass@1": accuracy, "b": b, "c": c, "p": sign_test(b, c),
            "generated_tokens": avg("generated_tokens"), "teacher_texts": avg("teacher_texts"),
            "optimizer_steps": avg("optimizer_steps"), "minutes": None if not costs else avg("wall_s") / 60,
            "profile_tokens": avg("profile_tokens")}


def markdown(rows: list[dict], against: str) -> str:
    lines = [f"| arm | seeds | held-out pass@1 | vs {against}: better / worse (sign test p) | tokens generated | "
             f"teacher texts | optimizer steps | minutes | profiles' share of tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = "-" if r["arm"] == against else f"{r['b']} / {r['c']} (p = {r['p']:.2g})"
        num = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}".replace(",", " ")  # noqa: E731
        lines.append(f"| {r['arm']} | {','.join(map(str, r['seeds']))} | {cell(r['pass@1'])} | {vs} | "
                     f"{num(r['generated_tokens'])} | {num(r['teacher_texts'])} | {num(r['optimizer_steps'])} | "
                     f"{num(r['minutes'], 1)} | {num(r['profile_tokens'], 2)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("root", type=Path, help="the experiment's directory (run.dir of python -m "
                                                "stagewise_pl.experiment): ARM/seed-N/ run directories")
    parser.add_argument("--against", default="method", help="the reference arm (default: method)")
    parser.add_argument("--arms", default="", help="comma-separated arms, in order (default: every arm found)")
    parser.add_argument("--benchmark", default="", help="held-out benchmark name (default: the first evaluated)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    arms = [a for a in args.arms.split(",") if a] or sorted(d.name for d in args.root.iterdir()
                                                            if d.is_dir() and any(d.glob("seed-*")))
    print(markdown(compare(args.root, args.against, arms, args.benchmark), args.against))
    return 0


if __name__ == "__main__":
    sys.exit(main())
