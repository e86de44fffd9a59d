"""Where an experiment's arms got (or lost) their held-out accuracy, from its run directories.

    python tools/claim_breakdown.py runs/experiment-skills [--skill-levels 7,8,9]

Prints, as Markdown, mean over the seeds found:
  1. held-out pass@1 (greedy) by level after every phase of every arm (the trajectory by level);
  2. for every arm that routes by profile: what its supervised phases trained on, by level: the problems of the
     routed bucket, how many of them got a target (the Bridge's verified rewrites, or the raw traces without it) and
     the CFT phases' problems;
  3. what each arm cost in teacher texts (the phases' ``teacher_texts``).
The figures come from the files a run writes (eval/*.json, routing/*.json, bridge/*.summary.json, state.json);
nothing is re-run. Levels are the synthetic task's (``arith-train-L<level>-...`` problem ids).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

LEVEL = re.compile(r"-L(\d+)-")


def level_of(problem_id: str) -> str:
    found = LEVEL.search(problem_id)
    return found.group(1) if found else "?"


def seeds(arm_dir: Path) -> list[Path]:
    return sorted(d for d in arm_dir.glob("seed-*") if (d / "state.json").is_file()
                  and json.loads((d / "state.json").read_text()).get("finished"))


def trajectory(run: Path) -> dict[str, dict[str, float]]:
    """label -> level -> greedy pass@1, in the order the phases ran (before first)."""
    completed = list(json.loads((run / "state.json").read_text())["completed"])
    out = {}
    for label in ["before", *completed]:
        path = run / "eval" / f"{label}.json"
        if path.is_file():
            result = next(iter(json.loads(path.read_text()).values()))
            out[label] = {lvl: row["pass@1"] for lvl, row in result["by_level"].items()}
    return out


def trained_by_level(run: Path) -> dict[str, dict[str, int]]:
    """phase -> {'<level>': problems routed to it} for every routed supervised phase, plus '<phase> trained': the
    problems with a target (the Bridge's verified rewrites, or raw traces without Bridge) where the phase bridged."""
    out: dict[str, dict[str, int]] = {}
    for path in sorted((run / "routing").glob("[0-9][0-9]-*.json")):
        decision = json.loads(path.read_text())
        name, kind = decision.get("phase"), decision.get("kind")
        if kind not in ("bridge_sft", "cft", "sft") or decision.get("select") == "all":
            continue
        counts: dict[str, int] = defaultdict(int)
        for pid in decision.get("ids", {}).get(decision.get("select"), []) or decision.get("selected", []):
            counts[level_of(pid)] += 1
        out[name] = dict(counts)
        bridged = run / "bridge" / f"{path.stem}.jsonl"
        if bridged.is_file():
            kept: dict[str, int] = defaultdict(int)
            for line in bridged.read_text().splitlines():
                row = json.loads(line)
                if row.get("kind") in ("bridged", "raw"):  # a verified rewrite, or the raw trace (no Bridge)
                    kept[level_of(row["problem_id"])] += 1
            out[f"{name} trained"] = dict(kept)
    return out


def teacher_texts(run: Path) -> int:
    completed = json.loads((run / "state.json").read_text())["completed"]
    return sum(int(s.get("teacher_texts") or 0) for s in completed.values())


def fmt(values: list[float]) -> str:
    return f"{mean(values):.2f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/claim_breakdown.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the experiment's run.dir")
    parser.add_argument("--skill-levels", default="",
                        help="levels to sum apart as 'skill' (default: the runs' task.skill_levels)")
    args = parser.parse_args(argv)
    arms = [d for d in sorted(args.root.iterdir()) if d.is_dir() and seeds(d)] if args.root.is_dir() else []
    if not arms:
        print(f"error: no finished runs under {args.root}", file=sys.stderr)
        return 2
    from stagewise_pl.experiment.results import skill_levels

    # the run's own task.skill_levels (as the experiment's table reads them), unless given
    skill = [s for s in args.skill_levels.split(",") if s] or skill_levels(seeds(arms[0])[0])
    print("## Held-out pass@1 by level after each phase (mean over seeds)\n")
    for arm in arms:
        runs = seeds(arm)
        paths = [trajectory(r) for r in runs]
        labels = list(paths[0])
        levels = [lvl for lvl in next(iter(paths[0].values())) if lvl != "all"]
        print(f"### {arm.name} ({len(runs)} seeds)\n")
        extra = ["skill", "rest"] if skill else []
        print("| after | " + " | ".join(f"L{lvl}" for lvl in levels) + " | all |" + "".join(f" {e} |" for e in extra))
        print("|---" * (len(levels) + 2 + len(extra)) + "|")
        for label in labels:
            rows = [p[label] for p in paths if label in p]
            cells = [fmt([r[lvl] for r in rows]) for lvl in [*levels, "all"]]
            if skill:
                cells.append(fmt([mean(r[lvl] for lvl in skill) for r in rows]))
                cells.append(fmt([mean(r[lvl] for lvl in levels if lvl not in skill) for r in rows]))
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
    print("## What the routed supervised phases trained on, by level (problems; mean over seeds)\n")
    for arm in arms:
        per_run = [trained_by_level(r) for r in seeds(arm)]
        if not per_run[0]:
            continue
        levels = sorted({lvl for run in per_run for c in run.values() for lvl in c}, key=lambda x: (len(x), x))
        print(f"### {arm.name}\n")
        print("| phase | " + " | ".join(f"L{lvl}" for lvl in levels) + " | all |")
        print("|---" * (len(levels) + 2) + "|")
        for phase in per_run[0]:
            counts = [run.get(phase, {}) for run in per_run]
            cells = [f"{mean(c.get(lvl, 0) for c in counts):.0f}" for lvl in levels]
            print(f"| {phase} | " + " | ".join(cells) + f" | {mean(sum(c.values()) for c in counts):.0f} |")
        print()
    print("## Teacher texts per run (mean over seeds)\n")
    for arm in arms:
        print(f"- {arm.name}: {mean(teacher_texts(r) for r in seeds(arm)):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
