"""An experiment's results: each run's figures, mean and std over seeds per arm, the budget checks, the table
and the plots (accuracy after each phase, held-out buckets, the flow of held-out problems between buckets, GRPO
reward curves), as ``results.md`` and ``results.json``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from stagewise_pl.buckets import BUCKET_ORDER, DEFAULT_BANDS
from stagewise_pl.experiment.spec import Experiment, run_dir, token_budgeted
from stagewise_pl.plots import Figures, bucket_bars, flow_matrix, series

TOLERANCE = 0.10  # arms that sample must end within this fraction of the generation budget


def read_run(directory: Path) -> Optional[dict]:
    """One run's figures: final accuracy, budget spent, accuracy and buckets after each evaluation, rewards."""
    state_path = directory / "state.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    phases = state.get("completed", {})
    steps = tokens = texts = profile_tokens = 0
    wall = profile_s = 0.0
    points = []  # (label, cumulative optimizer steps, eval dict)
    for label in ["before", *phases]:
        summary = phases.get(label, {})
        steps += int(summary.get("optimizer_steps", 0))
        tokens += int(summary.get("generated_tokens", 0))
        texts += int(summary.get("teacher_texts", 0))
        wall += float(summary.get("seconds", 0.0))
        if summary.get("kind") == "profile":  # what measuring the policy cost (issue Earn: at most a fifth)
            profile_tokens += int(summary.get("generated_tokens", 0))
            profile_s += float(summary.get("seconds", 0.0))
        path = directory / "eval" / f"{label}.json"
        if path.is_file():
            results = json.loads(path.read_text())
            name = next((n for n in results if n.startswith("synthetic")), None)
            if name:
                points.append((label, steps, results[name]))
    rewards = []
    for curve in sorted((directory / "curves").glob("*.json")):
        curves = json.loads(curve.read_text())
        if "reward" in curves:  # the phases that roll out and learn from rewards
            rewards += [v for v in curves["reward"] if v is not None]
    skills = skill_levels(directory)
    final = points[-1][2]["by_level"] if points else {}
    return {"finished": bool(state.get("finished")), "optimizer_steps": steps, "generated_tokens": tokens,
            "teacher_texts": texts, "skill_levels": skills,
            # the skill task: held-out pass@1 after the last phase on the levels that need the skill, and on the rest
            "skill": group_pass(final, skills) if skills else None,
            "rest": group_pass(final, [lvl for lvl in final if lvl != "all" and lvl not in skills]) if skills else None,
            "wall_s": wall, "points": points, "rewards": rewards,
            "profile_tokens": profile_tokens / tokens if tokens else 0.0,
            "profile_time": profile_s / wall if wall else 0.0,
            "phases": {n: s.get("kind") for n, s in phases.items()}}


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def skill_levels(directory: Path) -> list[str]:
    """The levels of a run's synthetic task that need a skill the base model never saw (``task.skill_levels``, numbered
    after ``task.levels``), from its config.yaml; [] for the plain task."""
    from omegaconf import OmegaConf

    path = directory / "config.yaml"
    task = (OmegaConf.to_container(OmegaConf.load(path)).get("task") or {}) if path.is_file() else {}
    plain, skill = len(task.get("levels") or []), len(task.get("skill_levels") or [])
    return [str(plain + i) for i in range(1, skill + 1)]


def group_pass(by_level: dict, levels, metric: str = "pass@1") -> Optional[float]:
    """``metric`` over the problems of ``levels`` (each level weighted by its problem count); None if none."""
    rows = [by_level[lvl] for lvl in levels if lvl in by_level and by_level[lvl].get("n")]
    n = sum(r["n"] for r in rows)
    return sum(r[metric] * r["n"] for r in rows) / n if n else None


def cell(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def collect(exp: Experiment, root: Path) -> dict:
    """Per arm: its runs' figures, the table's cells, the trajectories the plots draw."""
    arms = {}
    for arm in exp.arms:
        runs = {seed: read_run(run_dir(root, arm, seed)) for seed in exp.seeds}
        done = {s: r for s, r in runs.items() if r and r["finished"] and r["points"]}
        finals = [r["points"][-1][2]["by_level"] for r in done.values()]
        levels = sorted({lvl for f in finals for lvl in f if lvl != "all"}, key=lambda s: (len(s), s))
        budgeted = any(token_budgeted(p["kind"]) for p in arm.phases)  # phases that spend the token budget
        arms[arm.name] = {
            "title": arm.title, "seeds_done": sorted(done), "seeds_missing": sorted(set(exp.seeds) - set(done)),
            "budgeted": budgeted,
            "pass@1": [f["all"]["pass@1"] for f in finals],
            "skill": [r["skill"] for r in done.values() if r["skill"] is not None],
            "rest": [r["rest"] for r in done.values() if r["rest"] is not None],
            "levels": {lvl: [f[lvl]["pass@1"] for f in finals if lvl in f] for lvl in levels},
            "generated_tokens": [r["generated_tokens"] for r in done.values()],
            "teacher_texts": [r["teacher_texts"] for r in done.values()],
            "optimizer_steps": [r["optimizer_steps"] for r in done.values()],
            "wall_s": [r["wall_s"] for r in done.values()],
            "profile_tokens": [r["profile_tokens"] for r in done.values()],
            "profile_time": [r["profile_time"] for r in done.values()],
            "trajectory": trajectory([r["points"] for r in done.values()]),
            "flow": flow([r["points"] for r in done.values()]),
            "rewards": average_series([r["rewards"] for r in done.values()]),
        }
    return {"experiment": exp.source, "quick": exp.quick, "seeds": exp.seeds, "budget": {
        "optimizer_steps": exp.optimizer_steps, "generated_tokens": exp.generated_tokens}, "arms": arms}


def trajectory(runs: list[list]) -> list[dict]:
    """Per evaluation point (the same labels in every seed's run): mean steps, pass@1 and bucket fractions."""
    if not runs:
        return []
    labels = [p[0] for p in runs[0]]
    out = []
    for i, label in enumerate(labels):
        at = [r[i] for r in runs if len(r) > i and r[i][0] == label]
        row = {"label": label, "steps": sum(p[1] for p in at) / len(at),
               "pass@1": mean_std([p[2]["by_level"]["all"]["pass@1"] for p in at])}
        for bucket in BUCKET_ORDER:
            row[bucket] = mean_std([p[2]["by_level"]["all"].get(bucket) for p in at])[0]
        out.append(row)
    return out


def flow(runs: list[list], bands=DEFAULT_BANDS) -> dict:
    """Held-out problems moved between buckets (by sampled pass rate) from before training to the last
    evaluation, summed over seeds: matrix[from][to]."""
    matrix = {a: {b: 0 for b in BUCKET_ORDER} for a in BUCKET_ORDER}
    for points in runs:
        if len(points) < 2:
            continue
        first, last = points[0][2].get("problems", {}), points[-1][2].get("problems", {})
        for pid, (_, p0) in first.items():
            if p0 is not None and pid in last and last[pid][1] is not None:
                matrix[bands.bucket(p0)][bands.bucket(last[pid][1])] += 1
    return matrix


def average_series(runs: list[list[float]]) -> list[float]:
    n = min((len(s) for s in runs), default=0)
    return [sum(s[i] for s in runs) / len(runs) for i in range(n)]


# ------------------------------------------------------------------ the table and the plots
def table(data: dict) -> tuple[list[str], list[list[str]]]:
    levels = sorted({lvl for a in data["arms"].values() for lvl in a["levels"]}, key=lambda s: (len(s), s))
    split = any(a.get("skill") for a in data["arms"].values())  # the skill task: skill levels and the rest apart
    header = ["arm", "seeds", "pass@1 (all)", *(["pass@1 (skill levels)", "pass@1 (other levels)"] if split else []),
              *[f"L{lvl}" for lvl in levels], "tokens generated", "optimizer steps", "teacher texts", "wall time (s)",
              "profiles' share of tokens", "profiles' share of time"]
    rows = []
    for a in data["arms"].values():
        rows.append([a["title"], str(len(a["seeds_done"])), cell(a["pass@1"]),
                     *([cell(a.get("skill", [])), cell(a.get("rest", []))] if split else []),
                     *[cell(a["levels"].get(lvl, []), 2) for lvl in levels], cell(a["generated_tokens"], 0),
                     cell(a["optimizer_steps"], 0), cell(a["teacher_texts"], 0), cell(a["wall_s"], 0),
                     cell(a.get("profile_tokens", []), 2), cell(a.get("profile_time", []), 2)])
    return header, rows


def budget_checks(data: dict) -> list[str]:
    """What the budgets came to: equal optimizer steps; generated tokens within TOLERANCE for sampling arms."""
    lines, b = [], data["budget"]
    for name, a in data["arms"].items():
        steps = sorted(set(a["optimizer_steps"]))
        ok_steps = steps == [b["optimizer_steps"]]
        tokens = a["generated_tokens"]
        if not a["budgeted"]:
            token_note = f"no GRPO phase to spend the token budget: generated {cell(tokens, 0)} tokens"
            ok_tokens = True
        else:
            worst = max((abs(t - b["generated_tokens"]) / b["generated_tokens"] for t in tokens), default=None)
            ok_tokens = worst is not None and worst <= TOLERANCE
            token_note = (f"tokens {cell(tokens, 0)}, at most {worst:.1%} off the budget" if worst is not None
                          else "no finished run")
        lines.append(f"- {a['title']}: optimizer steps {steps} ({'equal' if ok_steps else 'NOT equal'} to "
                     f"{b['optimizer_steps']}); {token_note}" + ("" if ok_tokens else " -- OUTSIDE the 10% band"))
    return lines


def plots(data: dict, out: Path) -> list[tuple[str, str]]:
    figs = Figures(out)
    arms = [(n, a) for n, a in data["arms"].items() if a["trajectory"]]

    fig, axes = figs.figure(8, 4.2)
    ax = axes[0][0]
    for name, a in arms:
        xs = [p["steps"] for p in a["trajectory"]]
        ys = [p["pass@1"][0] for p in a["trajectory"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=a["title"], linewidth=2.2 if name == "stagewise" else 1.2)
    ax.set(xlabel="optimizer steps", ylabel="held-out pass@1 (mean over seeds)", title="accuracy after each phase")
    ax.legend(fontsize=7, loc="best")
    figs.save(fig, "accuracy.png", "Held-out pass@1 after each phase, per arm (x: optimizer steps spent)")

    fig, axes = figs.grid(len(arms))
    for ax, (name, a) in zip(axes, arms):
        labels = [p["label"] for p in a["trajectory"]]
        bucket_bars(ax, labels, {b: [p[b] for p in a["trajectory"]] for b in BUCKET_ORDER}, rotate=True)
        ax.set(ylim=(0, 1), title=a["title"])
        ax.title.set_fontsize(8)
    axes[0].legend(fontsize=6)
    figs.save(fig, "buckets.png", "Held-out problems per bucket (easy p=1, medium, hard p=0) after each phase, per arm")

    fig, axes = figs.grid(len(arms))
    for ax, (name, a) in zip(axes, arms):
        flow_matrix(ax, a["flow"], "at the end", "before training", a["title"], fontsize=8)
        ax.title.set_fontsize(8)
    figs.save(fig, "flow.png",
              "Flow of held-out problems between buckets, before training to the end (summed over seeds)")

    fig, axes = figs.figure(8, 3.8)
    ax = axes[0][0]
    for name, a in data["arms"].items():
        if a["rewards"]:
            series(ax, a["rewards"], "GRPO rollout step (across the arm's GRPO phases)",
                   "reward (mean over seeds, 5 steps)", "GRPO reward curves", smooth=5, label=a["title"])
    if ax.lines:
        ax.legend(fontsize=7)
    figs.save(fig, "rewards.png", "GRPO training reward per rollout step (running mean of 5), per arm with RL")
    return figs.made


def markdown(data: dict, images: list[tuple[str, str]], command: str) -> str:
    header, rows = table(data)
    b = data["budget"]
    lines = ["# Experiment results" + (" (--quick)" if data["quick"] else ""), "",
             f"Command: `{command}`", "",
             f"Budget per run: {b['optimizer_steps']} optimizer steps; {b['generated_tokens']} generated tokens for "
             f"every arm that samples from the student. Seeds: {data['seeds']}. Held-out pass@1 is greedy, on the "
             f"synthetic test split, after the run's last phase; mean ± std over seeds. Teacher texts: what a "
             f"teacher wrote for the run's training data (traces, simplifications, critiques, repairs; a real "
             f"teacher's cost), counted by the phases that use them. Wall time: the phases' "
             f"seconds (training, profiles, data making), not the evaluations.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", "## Budgets", "", *budget_checks(data), ""]
    missing = [(a["title"], a["seeds_missing"]) for a in data["arms"].values() if a["seeds_missing"]]
    if missing:
        lines += ["**Runs missing or not finished:** " + "; ".join(f"{t}: seeds {s}" for t, s in missing), ""]
    lines += ["## Accuracy after each phase (mean over seeds)", ""]
    for a in data["arms"].values():
        lines.append(f"- {a['title']}: " + ", ".join(f"{p['label']} ({p['steps']:.0f} steps) {p['pass@1'][0]:.3f}"
                                                   for p in a["trajectory"]))
    lines.append("")
    for title, name in images:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def write_results(exp: Experiment, root: Path, command: str) -> dict:
    data = collect(exp, root)
    images = plots(data, root)
    (root / "results.md").write_text(markdown(data, images, command))
    (root / "results.json").write_text(json.dumps(dict(data, plots=[n for _, n in images]), indent=1))
    return data

