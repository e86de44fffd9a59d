"""Bridge SFT against SFT on the raw teacher traces, at equal steps, on the synthetic task.

For each seed and each bridge strategy (``raw`` is the baseline: the teacher traces as they are), one
run of ``python -m stagewise_pl.fit`` from the same cached tiny base model: profile the pool, then
``bridge_sft`` on the problems the student cannot solve (``hard``) for ``--steps`` steps, then a
held-out evaluation. The teacher is the programmatic one writing ``chunked`` traces
(``--ops-per-line`` operations per line: correct, coarser than the student's own steps).

Prints, per strategy and seed: acceptance, the student's mean token NLL of the raw traces and of the
targets it trained on (before training), and held-out greedy pass@1 before and after.

    python tools/compare_bridge.py [--seeds 0 1] [--steps 60] [--strategies raw student_rewrite ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = ["raw", "student_rewrite", "prefix_hint", "teacher_simplify", "min_nll_select"]


def one_run(directory: Path, seed: int, strategy: str, args) -> dict:
    phases = (f"[{{name: profile, kind: profile}}, {{name: bridge, kind: bridge_sft, select: hard, "
              f"steps: {args.steps}, lr: {args.lr}}}, {{name: final, kind: eval}}]")
    cmd = [sys.executable, "-m", "stagewise_pl.fit", f"run.dir={directory}", f"run.seed={seed}",
           "run.progress_bar=false", "eval.k=0", "eval.each_phase=false", f"profile.limit={args.profile_limit}",
           f"bridge.strategy={strategy}", f"bridge.fallback={args.fallback}", "teacher.style=chunked",
           f"teacher.ops_per_line={args.ops_per_line}",
           f"phases={phases}", *args.overrides]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    summary = json.loads((directory / "bridge" / "02-bridge.summary.json").read_text())

    def pass1(label):
        figures = json.loads((directory / "eval" / f"{label}.json").read_text())
        return figures["synthetic-test"]["by_level"]["all"]["pass@1"]

    return {"strategy": strategy, "seed": seed, "problems": summary["problems"], "acceptance": summary["acceptance"],
            "nll_raw": summary["nll_raw"], "nll_target": summary["nll_target"], "before": pass1("before"),
            "after": pass1("final")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--steps", type=int, default=60, help="bridge_sft optimizer steps (equal for every strategy)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ops-per-line", type=int, default=2, help="the teacher's operations per trace line")
    parser.add_argument("--profile-limit", type=int, default=1200)
    parser.add_argument("--fallback", choices=["raw", "drop"], default="raw",
                        help="a problem with no kept candidate trains on the raw trace (raw, as the method says) or "
                             "is left out (drop, the default conf's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="further key=value overrides of every run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for strategy in args.strategies:
                rows.append(one_run(Path(tmp) / f"{strategy}-{seed}", seed, strategy, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| strategy | seed | hard problems | acceptance | NLL raw | NLL trained target | pass@1 before | "
          f"pass@1 after {args.steps} steps |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['seed']} | {r['problems']} | {r['acceptance']} | {r['nll_raw']} | "
              f"{r['nll_target']} | {r['before']:.3f} | {r['after']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
