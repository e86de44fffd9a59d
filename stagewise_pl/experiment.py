"""The Claim experiment: arms x seeds at equal budgets, one table and its plots.

    python -m stagewise_pl.experiment [--quick] [run.dir=PATH] [--arms a,b] [--seeds 0,1,2] [--jobs N]
    python -m stagewise_pl.experiment --slurm [--time HH:MM:SS] [--partition P] [run.dir=PATH]
    python -m stagewise_pl.experiment --report run.dir=PATH
    python -m stagewise_pl.experiment --dry-run [--quick]

Reads ``conf/experiment.yaml`` (``--conf PATH`` for another): a base conf, the overrides of every arm, the
arms (their overrides and phases, each training phase with a ``share`` of the budget's optimizer steps), the
budget (``optimizer_steps``, ``generated_tokens``) and the seeds; ``quick`` replaces the budget, the seeds and
adds overrides for ``--quick``. Every arm x seed is an independent ``python -m stagewise_pl.fit`` run in
``<run.dir>/<arm>/seed-<s>``, started in a process of its own (its log in ``<run.dir>/logs/``): a finished run is
skipped, a stopped one resumes from its checkpoint, so running the command again continues an experiment cut
short. ``--slurm`` submits the same runs as one Slurm array (one task per arm x seed, the sbatch script of
:mod:`stagewise_pl.slurm`) and a report job that waits for the array. Then the experiment's directory holds
``results.md`` (mean and std over seeds of held-out pass@1 overall and per level, tokens generated, optimizer
steps, wall time), ``results.json`` and the plots: accuracy after each phase per arm, held-out problems per
bucket after each phase, the flow of held-out problems between buckets from before training to the end, and
the GRPO reward curves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stagewise_pl.config import CONF_DIR
from stagewise_pl.report import BUCKET_ORDER, ReportError, bucket_of

TRAINING_KINDS = ("sft", "bridge_sft", "cft", "grpo")
TOLERANCE = 0.10  # arms that sample must end within this fraction of the generation budget


class ExperimentError(ValueError):
    """A bad experiment file or argument; the message names it."""


@dataclass
class Arm:
    name: str
    title: str
    overrides: list[str]
    phases: list[dict]


@dataclass
class Experiment:
    base: str
    seeds: list[int]
    optimizer_steps: int
    generated_tokens: int
    overrides: list[str]
    arms: list[Arm]
    source: str = ""
    quick: bool = False


# ------------------------------------------------------------------ the experiment file
def load_experiment(path: Path, quick: bool = False) -> Experiment:
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ExperimentError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: must hold a mapping")
    unknown = set(raw) - {"base", "seeds", "budget", "overrides", "arms", "quick"}
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}")
    if quick:
        q = raw.get("quick") or {}
        if not q:
            raise ExperimentError(f"{path}: --quick needs a 'quick' section")
        raw = dict(raw, seeds=q.get("seeds", raw.get("seeds")), budget={**raw.get("budget", {}), **q.get("budget", {})},
                   overrides=list(raw.get("overrides") or []) + list(q.get("overrides") or []))
    budget = raw.get("budget") or {}
    steps, tokens = budget.get("optimizer_steps"), budget.get("generated_tokens")
    if not isinstance(steps, int) or steps < 1:
        raise ExperimentError(f"{path}: budget.optimizer_steps must be an integer >= 1, got {steps!r}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ExperimentError(f"{path}: budget.generated_tokens must be an integer >= 1, got {tokens!r}")
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ExperimentError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    arms = []
    for name, spec in (raw.get("arms") or {}).items():
        where = f"{path}: arms.{name}"
        if not isinstance(spec, dict) or not spec.get("phases"):
            raise ExperimentError(f"{where}: needs phases")
        for i, phase in enumerate(spec["phases"]):
            if "kind" not in phase:
                raise ExperimentError(f"{where}.phases.{i}: needs a kind")
            if phase["kind"] in TRAINING_KINDS and not (isinstance(phase.get("share"), (int, float)) and phase["share"] > 0):
                raise ExperimentError(f"{where}.phases.{i}: a {phase['kind']} phase needs a share > 0 of the "
                                      f"optimizer steps")
            if "steps" in phase or "epochs" in phase:
                raise ExperimentError(f"{where}.phases.{i}: give a share of budget.optimizer_steps, not steps")
        arms.append(Arm(name, spec.get("title", name), list(spec.get("overrides") or []), list(spec["phases"])))
    if not arms:
        raise ExperimentError(f"{path}: no arms")
    return Experiment(raw.get("base", "default"), seeds, steps, tokens, list(raw.get("overrides") or []), arms,
                      str(path), quick)


def allot(phases: list[dict], total: int) -> list[dict]:
    """The arm's phases with ``steps`` for every training phase: shares of ``total`` turned into integers that sum
    to it exactly (largest remainder, ties to the earlier phase)."""
    shares = [(i, float(p["share"])) for i, p in enumerate(phases) if p["kind"] in TRAINING_KINDS]
    whole = sum(s for _, s in shares)
    exact = {i: total * s / whole for i, s in shares}
    steps = {i: math.floor(v) for i, v in exact.items()}
    for i in sorted(exact, key=lambda i: (steps[i] - exact[i], i))[:total - sum(steps.values())]:
        steps[i] += 1
    out = []
    for i, p in enumerate(phases):
        q = {k: v for k, v in p.items() if k != "share"}
        if i in steps:
            if steps[i] < 1:
                raise ExperimentError(f"phase {p.get('name', i)}: its share of {total} optimizer steps is 0 steps")
            q["steps"] = steps[i]
        out.append(q)
    return out


def run_dir(root: Path, arm: Arm, seed: int) -> Path:
    return root / arm.name / f"seed-{seed}"


def fit_args(exp: Experiment, arm: Arm, seed: int, root: Path) -> list[str]:
    """The command line of one arm x seed for ``python -m stagewise_pl.fit``."""
    return [f"conf={exp.base}", *exp.overrides, *arm.overrides,
            "phases=" + json.dumps(allot(arm.phases, exp.optimizer_steps)),
            f"grpo.token_budget={exp.generated_tokens}", f"run.seed={seed}", f"run.dir={run_dir(root, arm, seed)}"]


def check_configs(exp: Experiment, root: Path) -> None:
    """Every run's configuration must load before any run starts."""
    from stagewise_pl.config import ConfigError, load_config

    for arm in exp.arms:
        try:
            load_config(exp.base, fit_args(exp, arm, exp.seeds[0], root)[1:])
        except ConfigError as exc:
            raise ExperimentError(f"arm {arm.name}: {exc}") from None


def resume_args(directory: Path) -> list[str]:
    """A checkpoint: continue from it; a run stopped before its first one: start it over; else a fresh run."""
    ckpts = directory / "checkpoints"
    if (ckpts / "last.ckpt").is_file() or (ckpts / "previous.ckpt").is_file():
        return ["resume=last"]
    return ["resume=restart"] if (directory / "state.json").is_file() else []


def finished(directory: Path) -> bool:
    path = directory / "state.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("finished"))


# ------------------------------------------------------------------ running
def run_local(exp: Experiment, root: Path, jobs: int = 1) -> int:
    """Every arm x seed (seeds outermost, so early results compare arms), ``jobs`` runs at a time, each with
    an equal share of the machine's cores (run.threads); returns the number of failed runs, or 128 + SIGINT
    when a signal stopped them (their checkpoints hold; the same command continues)."""
    todo = [(arm, seed) for seed in exp.seeds for arm in exp.arms]
    (root / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # Ctrl-C reaches the runs too (one process group): each checkpoints its step and exits; this loop only stops
    # starting new ones and waits for them
    interrupted: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        return _loop(exp, root, jobs, todo, threads, interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)


def _loop(exp: Experiment, root: Path, jobs: int, todo: list, threads: int, interrupted: list) -> int:
    failures, started, n, stopped = 0, time.time(), 0, False
    running: dict = {}  # Popen -> (label, log handle, start time)
    while todo or running:
        while todo and len(running) < jobs and not stopped and not interrupted:
            arm, seed = todo.pop(0)
            n += 1
            directory = run_dir(root, arm, seed)
            label = f"[{n}/{len(exp.arms) * len(exp.seeds)}] {arm.name} seed {seed}"
            if finished(directory):
                print(f"{label}: finished earlier", flush=True)
                continue
            resume = resume_args(directory)
            log = root / "logs" / f"{arm.name}-seed{seed}.log"
            command = [sys.executable, "-m", "stagewise_pl.fit", *fit_args(exp, arm, seed, root), *resume] + \
                ([f"run.threads={threads}"] if jobs > 1 else [])
            handle = open(log, "a")
            handle.write(f"$ {shlex.join(command)}\n")
            handle.flush()
            print(f"{label}: running" + (f" ({resume[0]})" if resume else "") + f", log {log}", flush=True)
            running[subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)] = (label, handle, time.time())
        if not running:
            break
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            label, handle, t0 = running.pop(proc)
            handle.close()
            rc = proc.returncode
            if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
                print(f"{label}: stopped by a signal; run the same command again to continue", flush=True)
                stopped = True
            elif rc:
                failures += 1
                print(f"{label}: FAILED (exit {rc}); see its log in {root / 'logs'}", flush=True)
            else:
                elapsed = time.time() - started
                left = len(todo) * elapsed / max(1, n - len(running))
                print(f"{label}: done in {time.time() - t0:.0f} s; {elapsed / 60:.1f} min so far, about "
                      f"{left / 60:.0f} min left", flush=True)
    return 128 + signal.SIGINT if stopped or interrupted else failures


def submit_slurm(exp: Experiment, root: Path, args) -> int:
    """One array task per arm x seed (the sbatch script of stagewise_pl.slurm), then a report job after it."""
    from stagewise_pl.slurm import SlurmError, Task, render, sbatch

    tasks = [Task(i, str(run_dir(root, arm, seed)), fit_args(exp, arm, seed, root))
             for i, (arm, seed) in enumerate((a, s) for s in exp.seeds for a in exp.arms)]
    try:
        script = render(tasks, f"experiment-{root.name}", 1, args.gpus_per_node, args.cpus_per_task, args.time,
                        root / "logs", args.partition)
    except SlurmError as exc:
        raise ExperimentError(str(exc)) from None
    report = [sys.executable, "-m", "stagewise_pl.experiment", "--report", f"run.dir={root}", "--conf", exp.source] + \
        (["--quick"] if exp.quick else [])
    if args.dry_run:
        print(script, end="")
        print(f"# then, after the array: {shlex.join(report)}")
        return 0
    if (root / "manifest.json").exists():
        raise ExperimentError(f"{root} already holds a submission (manifest.json): wait for it, or remove "
                              f"manifest.json to submit again (finished runs do nothing, stopped ones resume)")
    try:
        job = sbatch(script, root)
    except SlurmError as exc:
        raise ExperimentError(str(exc)) from None
    after = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", "--job-name",
                            f"experiment-{root.name}-report", f"--output={root / 'logs' / 'report-%j.out'}",
                            "--wrap", shlex.join(report)], capture_output=True, text=True)
    manifest = {"job_id": job, "report_job": after.stdout.strip() if not after.returncode else None,
                "tasks": {t.index: {"run_dir": t.run_dir, "overrides": t.overrides} for t in tasks}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"submitted array job {job}: {len(tasks)} runs (arms x seeds); "
          + (f"report job {manifest['report_job']} after it" if manifest["report_job"] else
             f"the report job was refused ({after.stderr.strip()}): run {shlex.join(report)} when the array is done"))
    return 0


# ------------------------------------------------------------------ reading the runs
def read_run(directory: Path) -> Optional[dict]:
    """One run's figures: final accuracy, budget spent, accuracy and buckets after each evaluation, rewards."""
    state_path = directory / "state.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    phases = state.get("completed", {})
    steps = tokens = 0
    wall = 0.0
    points = []  # (label, cumulative optimizer steps, eval dict)
    for label in ["before", *phases]:
        summary = phases.get(label, {})
        steps += int(summary.get("optimizer_steps", 0))
        tokens += int(summary.get("generated_tokens", 0))
        wall += float(summary.get("seconds", 0.0))
        path = directory / "eval" / f"{label}.json"
        if path.is_file():
            results = json.loads(path.read_text())
            name = next((n for n in results if n.startswith("synthetic")), None)
            if name:
                points.append((label, steps, results[name]))
    rewards = []
    for curve in sorted((directory / "curves").glob("*.json")):
        series = json.loads(curve.read_text())
        if phases.get(curve.stem.split("-", 1)[1], {}).get("kind") == "grpo" and "reward" in series:
            rewards += [v for v in series["reward"] if v is not None]
    return {"finished": bool(state.get("finished")), "optimizer_steps": steps, "generated_tokens": tokens,
            "wall_s": wall, "points": points, "rewards": rewards,
            "phases": {n: s.get("kind") for n, s in phases.items()}}


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


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
        budgeted = any(p["kind"] == "grpo" for p in arm.phases)  # GRPO phases spend the token budget
        arms[arm.name] = {
            "title": arm.title, "seeds_done": sorted(done), "seeds_missing": sorted(set(exp.seeds) - set(done)),
            "budgeted": budgeted,
            "pass@1": [f["all"]["pass@1"] for f in finals],
            "levels": {lvl: [f[lvl]["pass@1"] for f in finals if lvl in f] for lvl in levels},
            "generated_tokens": [r["generated_tokens"] for r in done.values()],
            "optimizer_steps": [r["optimizer_steps"] for r in done.values()],
            "wall_s": [r["wall_s"] for r in done.values()],
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


def flow(runs: list[list]) -> dict:
    """Held-out problems moved between buckets (by sampled pass rate) from before training to the last
    evaluation, summed over seeds: matrix[from][to]."""
    matrix = {a: {b: 0 for b in BUCKET_ORDER} for a in BUCKET_ORDER}
    for points in runs:
        if len(points) < 2:
            continue
        first, last = points[0][2].get("problems", {}), points[-1][2].get("problems", {})
        for pid, (_, p0) in first.items():
            if p0 is not None and pid in last and last[pid][1] is not None:
                matrix[bucket_of(p0)][bucket_of(last[pid][1])] += 1
    return matrix


def average_series(series: list[list[float]]) -> list[float]:
    n = min((len(s) for s in series), default=0)
    return [sum(s[i] for s in series) / len(series) for i in range(n)]


# ------------------------------------------------------------------ the table and the plots
def table(data: dict) -> tuple[list[str], list[list[str]]]:
    levels = sorted({lvl for a in data["arms"].values() for lvl in a["levels"]}, key=lambda s: (len(s), s))
    header = ["arm", "seeds", "pass@1 (all)", *[f"L{lvl}" for lvl in levels], "tokens generated", "optimizer steps",
              "wall time (s)"]
    rows = []
    for a in data["arms"].values():
        rows.append([a["title"], str(len(a["seeds_done"])), cell(a["pass@1"]), *[cell(a["levels"].get(lvl, []), 2)
                     for lvl in levels], cell(a["generated_tokens"], 0), cell(a["optimizer_steps"], 0),
                     cell(a["wall_s"], 0)])
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
    from stagewise_pl.report import _pyplot

    plt = _pyplot()
    made: list[tuple[str, str]] = []
    arms = [(n, a) for n, a in data["arms"].items() if a["trajectory"]]

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        made.append((title, name))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, a in arms:
        xs = [p["steps"] for p in a["trajectory"]]
        ys = [p["pass@1"][0] for p in a["trajectory"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=a["title"], linewidth=2.2 if name == "stagewise" else 1.2)
    ax.set(xlabel="optimizer steps", ylabel="held-out pass@1 (mean over seeds)", title="accuracy after each phase")
    ax.legend(fontsize=7, loc="best")
    save(fig, "accuracy.png", "Held-out pass@1 after each phase, per arm (x: optimizer steps spent)")

    cols = min(4, max(1, len(arms)))
    rows = -(-len(arms) // cols) if arms else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (name, a) in zip(axes.flat, arms):
        ax.set_visible(True)
        labels = [p["label"] for p in a["trajectory"]]
        bottom = [0.0] * len(labels)
        for bucket, color in zip(BUCKET_ORDER, ("#4caf50", "#ffb300", "#e53935")):
            values = [p[bucket] or 0.0 for p in a["trajectory"]]
            ax.bar(range(len(labels)), values, bottom=bottom, color=color, label=bucket)
            bottom = [x + v for x, v in zip(bottom, values)]
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=6)
        ax.set(ylim=(0, 1), title=a["title"])
        ax.title.set_fontsize(8)
    axes.flat[0].legend(fontsize=6)
    save(fig, "buckets.png", "Held-out problems per bucket (easy p=1, medium, hard p=0) after each phase, per arm")

    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (name, a) in zip(axes.flat, arms):
        ax.set_visible(True)
        grid = [[a["flow"][x][y] for y in BUCKET_ORDER] for x in BUCKET_ORDER]
        ax.imshow(grid, cmap="Blues")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(3), BUCKET_ORDER, fontsize=7)
        ax.set_yticks(range(3), BUCKET_ORDER, fontsize=7)
        ax.set(xlabel="at the end", ylabel="before training", title=a["title"])
        ax.title.set_fontsize(8)
    save(fig, "flow.png", "Flow of held-out problems between buckets, before training to the end (summed over seeds)")

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for name, a in data["arms"].items():
        if a["rewards"]:
            r = a["rewards"]
            smooth = [sum(r[max(0, i - 4):i + 1]) / len(r[max(0, i - 4):i + 1]) for i in range(len(r))]
            ax.plot(range(1, len(r) + 1), smooth, label=a["title"], linewidth=1.2)
    ax.set(xlabel="GRPO rollout step (across the arm's GRPO phases)",
           ylabel="reward (mean over seeds, 5 steps)", title="GRPO reward curves")
    if ax.lines:
        ax.legend(fontsize=7)
    save(fig, "rewards.png", "GRPO training reward per rollout step (running mean of 5), per arm with RL")
    return made


def markdown(data: dict, images: list[tuple[str, str]], command: str) -> str:
    header, rows = table(data)
    b = data["budget"]
    lines = ["# Experiment results" + (" (--quick)" if data["quick"] else ""), "",
             f"Command: `{command}`", "",
             f"Budget per run: {b['optimizer_steps']} optimizer steps; {b['generated_tokens']} generated tokens for "
             f"every arm that samples from the student. Seeds: {data['seeds']}. Held-out pass@1 is greedy, on the "
             f"synthetic test split, after the run's last phase; mean ± std over seeds. Wall time: the phases' "
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


# ------------------------------------------------------------------ the command
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise_pl.experiment", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help="run.dir=PATH: the experiment's directory "
                                                    "(default runs/experiment[-quick])")
    parser.add_argument("--conf", default=str(CONF_DIR / "experiment.yaml"), help="the experiment file")
    parser.add_argument("--quick", action="store_true", help="the file's quick section: a small budget (CI)")
    parser.add_argument("--arms", help="comma-separated arm names (default: every arm)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the file's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine, each with an equal "
                                                              "share of its cores (default 1)")
    parser.add_argument("--report", action="store_true", help="only write the results from the runs there")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command line (or with --slurm the "
                                                               "sbatch script) and start nothing")
    parser.add_argument("--slurm", action="store_true", help="submit one Slurm array task per arm x seed")
    parser.add_argument("--time", default="04:00:00", help="--slurm: time limit per task")
    parser.add_argument("--partition", help="--slurm: partition")
    parser.add_argument("--cpus-per-task", type=int, default=2, help="--slurm: CPUs per task")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="--slurm: GPUs per task (0: CPU)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        root = None
        for item in args.settings:
            key, sep, value = item.partition("=")
            if key != "run.dir" or not sep or not value:
                raise ExperimentError(f"{item!r}: the only setting is run.dir=PATH (arms take their settings from "
                                      f"the experiment file)")
            root = Path(value)
        root = (root or Path("runs") / ("experiment-quick" if args.quick else "experiment")).resolve()
        exp = load_experiment(Path(args.conf), args.quick)
        if args.arms:
            wanted = args.arms.split(",")
            unknown = set(wanted) - {a.name for a in exp.arms}
            if unknown:
                raise ExperimentError(f"--arms: no arm {sorted(unknown)}; arms: {', '.join(a.name for a in exp.arms)}")
            exp.arms = [a for a in exp.arms if a.name in wanted]
        if args.seeds:
            try:
                exp.seeds = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise ExperimentError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
        command = shlex.join(["python", "-m", "stagewise_pl.experiment", *(sys.argv[1:] if argv is None else argv)])
        if args.report:
            write_results(exp, root, command)
            print(f"results: {root / 'results.md'}")
            return 0
        check_configs(exp, root)
        if args.slurm:
            return submit_slurm(exp, root, args)
        if args.dry_run:
            for seed in exp.seeds:
                for arm in exp.arms:
                    print(shlex.join(["python", "-m", "stagewise_pl.fit", *fit_args(exp, arm, seed, root)]))
            return 0
        root.mkdir(parents=True, exist_ok=True)
        print(f"experiment {exp.source}{' (quick)' if exp.quick else ''}: {len(exp.arms)} arms x {len(exp.seeds)} "
              f"seeds in {root}", flush=True)
        if args.jobs < 1:
            raise ExperimentError(f"--jobs {args.jobs}: must be >= 1")
        failures = run_local(exp, root, args.jobs)
        if failures >= 128:
            return failures
        write_results(exp, root, command)
        print(f"results: {root / 'results.md'}" + (f"; {failures} run(s) failed (see logs/)" if failures else ""))
        return 1 if failures else 0
    except (ExperimentError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
