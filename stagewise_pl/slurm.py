"""Slurm array submission: one array task per (config x seed), each in its own run directory.

    python -m stagewise_pl.slurm submit conf=NAME [key=value ...] --array seed=0,1,2 [--sweep key=v1,v2]
        [--nodes N] [--gpus-per-node G] [--cpus-per-task C] [--time HH:MM:SS] [--partition P] [--dry-run]
    python -m stagewise_pl.slurm status [--root DIR]

``submit`` renders an sbatch script (printed with ``--dry-run``, else written beside a manifest and
given to ``sbatch``). Slurm and Lightning do the work: ``srun`` starts one process per GPU and
Lightning reads its ranks from the SLURM environment; no launcher of our own. Every srun task (every
rank) is sent USR1 120 s before the time limit (``--signal=USR1@120``); the run then checkpoints the
step in progress, rank 0 asks ``scontrol requeue`` for its array task, and the process exits (see
:mod:`stagewise_pl.preempt`). A USR1 sent to the batch shell alone (``scancel --batch --signal=USR1``)
is passed on to srun. A task that finds ``last.ckpt`` in its run directory continues with
``resume=last``.

Tested with bash and stand-in srun/scontrol (tests/test_slurm.py) and against a real one-node Slurm
(tests/test_slurm_cluster.py, marker slurm): an array, ``scontrol requeue`` of a running task, and a
USR1 to the task's steps. Several nodes have not run (see docs/SCALE_OUT.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class SlurmError(ValueError):
    """Bad arguments: the message says which."""


@dataclass
class Task:
    index: int
    run_dir: str
    overrides: list[str]


def parse_values(spec: str, flag: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> (key, [v1, v2])."""
    if "=" not in spec:
        raise SlurmError(f"{flag} {spec!r}: expected key=v1,v2,...")
    key, values = spec.split("=", 1)
    items = [v for v in values.split(",") if v != ""]
    if not key or not items:
        raise SlurmError(f"{flag} {spec!r}: expected key=v1,v2,...")
    return key.strip(), items


def plan_tasks(conf: str, overrides: list[str], array: str, sweeps: list[str], root: Path) -> list[Task]:
    """The cross product of the seeds and every sweep, one run directory each (never shared)."""
    key, seeds = parse_values(array, "--array")
    if key != "seed":
        raise SlurmError(f"--array {array!r}: the array runs over seeds (seed=0,1,2); sweep other keys with --sweep")
    axes = [("run.seed", seeds)] + [parse_values(s, "--sweep") for s in sweeps]
    tasks = []
    for i, combo in enumerate(itertools.product(*(values for _, values in axes))):
        chosen = [f"{k}={v}" for (k, _), v in zip(axes, combo)]
        label = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", f"{k.split('.')[-1]}{v}") for (k, _), v in zip(axes, combo))
        run_dir = str(root / f"{i:03d}-{label}")
        tasks.append(Task(i, run_dir, [f"conf={conf}", *overrides, *chosen, f"run.dir={run_dir}"]))
    return tasks


def render(tasks: list[Task], name: str, nodes: int, gpus_per_node: int, cpus_per_task: int, time: str,
           log_dir: Path, partition: Optional[str] = None, python: str = sys.executable) -> str:
    """The sbatch array script."""
    if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", time):
        raise SlurmError(f"--time {time!r}: expected HH:MM:SS (or D-HH:MM:SS)")
    if nodes < 1 or gpus_per_node < 0 or cpus_per_task < 1:
        raise SlurmError("--nodes and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
    per_node = max(1, gpus_per_node)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{len(tasks) - 1}",
             f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={per_node}",
             f"#SBATCH --cpus-per-task={cpus_per_task}", f"#SBATCH --time={time}",
             f"#SBATCH --output={log_dir}/%A_%a.out", "#SBATCH --open-mode=append",  # a requeued task adds to its log
             "#SBATCH --signal=USR1@120", "#SBATCH --requeue"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    scale = [f"trainer.num_nodes={nodes}", f"trainer.devices={per_node}"] + \
        (["trainer.accelerator=gpu", "trainer.strategy=ddp"] if gpus_per_node and nodes * per_node > 1 else [])
    lines += ["set -uo pipefail", 'case "$SLURM_ARRAY_TASK_ID" in']
    for t in tasks:
        args = " ".join(shlex.quote(a) for a in t.overrides + scale)
        lines.append(f"  {t.index}) RUN_DIR={shlex.quote(t.run_dir)}; ARGS=({args}) ;;")
    lines += ['  *) echo "no task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
              "# a checkpoint: continue from it; a run stopped before its first one: start it over",
              'RESUME=(); if [ -f "$RUN_DIR/checkpoints/last.ckpt" ] || [ -f "$RUN_DIR/checkpoints/previous.ckpt" ]; '
              'then RESUME=(resume=last); elif [ -f "$RUN_DIR/state.json" ]; then RESUME=(resume=restart); fi',
              f'srun {shlex.quote(python)} -m stagewise_pl.fit "${{ARGS[@]}}" "${{RESUME[@]}}" &',
              "CHILD=$!",
              "# USR1 (before the time limit) reaches the run through srun: it checkpoints, requeues this task and "
              "exits; one sent to this shell alone is passed on",
              'trap \'echo "USR1: passed on to the run"; kill -USR1 "$CHILD" 2>/dev/null\' USR1',
              'while :; do wait "$CHILD"; rc=$?; kill -0 "$CHILD" 2>/dev/null || break; done',
              'exit "$rc"']
    return "\n".join(lines) + "\n"


GPU_ACCELERATORS = ("gpu", "cuda")


def sbatch(script: str, root: Path) -> str:
    """Write ``root/submit.sbatch`` (and ``root/logs/``), submit it; the job id."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "submit.sbatch").write_text(script)
    out = subprocess.run(["sbatch", "--parsable", str(root / "submit.sbatch")], capture_output=True, text=True)
    if out.returncode:
        raise SlurmError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(args) -> int:
    from stagewise_pl.config import ConfigError, load_config

    root = Path(args.root).expanduser() / args.name
    tasks = plan_tasks(args.conf, args.overrides, args.array, args.sweep, root.resolve())
    for t in tasks:  # every task's configuration must load before anything is submitted
        try:
            cfg = load_config(args.conf, t.overrides[1:])
        except ConfigError as exc:
            raise SlurmError(f"task {t.index}: {exc}") from None
        if str(cfg.trainer.accelerator).lower() in GPU_ACCELERATORS and not args.gpus_per_node:
            raise SlurmError(f"task {t.index}: conf={args.conf} trains on GPUs (trainer.accelerator="
                             f"{cfg.trainer.accelerator}) but --gpus-per-node is 0, so Slurm would give it none: "
                             f"pass --gpus-per-node N (N GPUs per node, one process each), or "
                             f"trainer.accelerator=cpu to run it on CPUs")
    script = render(tasks, args.name, args.nodes, args.gpus_per_node, args.cpus_per_task, args.time,
                    root.resolve() / "logs", args.partition)
    if args.dry_run:
        print(script, end="")
        for t in tasks:
            print(f"# task {t.index}: {t.run_dir}")
        return 0
    if (root / "manifest.json").exists():
        raise SlurmError(f"{root} already holds a submission (manifest.json): choose another --name")
    job = sbatch(script, root)
    manifest = {"job_id": job, "tasks": {t.index: {"run_dir": t.run_dir, "overrides": t.overrides} for t in tasks}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"submitted array job {job}: {len(tasks)} tasks; manifest {root / 'manifest.json'}")
    return 0


def status(args) -> int:
    """One line per task of every manifest under ``--root``: finished, running (its phase), or not started."""
    manifests = sorted(Path(args.root).expanduser().glob("*/manifest.json"))
    if not manifests:
        print(f"no submissions under {args.root}")
        return 0
    for path in manifests:
        m = json.loads(path.read_text())
        print(f"{path.parent.name}: job {m['job_id']}")
        for index, task in sorted(m["tasks"].items(), key=lambda kv: int(kv[0])):
            state_path = Path(task["run_dir"]) / "state.json"
            if not state_path.is_file():
                print(f"  {index}: not started  {task['run_dir']}")
                continue
            state = json.loads(state_path.read_text())
            done = list(state.get("completed", {}))
            print(f"  {index}: {'finished' if state.get('finished') else 'running'} ({len(done)} phases done"
                  + (f", last {done[-1]}" if done else "") + f")  {task['run_dir']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise_pl.slurm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="render and submit an sbatch array (one task per config x seed)")
    s.add_argument("conf", help="conf=NAME")
    s.add_argument("overrides", nargs="*", help="key=value overrides for every task")
    s.add_argument("--array", default="seed=0", help="seeds: seed=0,1,2 (default seed=0)")
    s.add_argument("--sweep", action="append", default=[], help="key=v1,v2: one task per value (repeatable)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU tasks, one process per node")
    s.add_argument("--cpus-per-task", type=int, default=8)
    s.add_argument("--time", default="04:00:00", help="HH:MM:SS time limit per task")
    s.add_argument("--partition")
    s.add_argument("--name", default="", help="submission name: runs/slurm/<name>/ (default: conf and a timestamp)")
    s.add_argument("--root", default="runs/slurm", help="where submissions and their run directories go")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script and the run directories")
    st = sub.add_parser("status", help="summarise the tasks of every submission from their run directories")
    st.add_argument("--root", default="runs/slurm")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "status":
            return status(args)
        if not args.conf.startswith("conf="):
            raise SlurmError(f"expected conf=NAME first, got {args.conf!r}")
        args.conf = args.conf.split("=", 1)[1]
        if not args.name:
            args.name = f"{args.conf}-{time.strftime('%Y%m%d-%H%M%S')}"
        return submit(args)
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
