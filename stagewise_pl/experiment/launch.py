"""Running an experiment: every arm x seed as an independent ``python -m stagewise_pl.fit`` process on this
machine (``--jobs N`` at a time, finished runs skipped, stopped ones resumed), or one Slurm array and a report job."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from stagewise_pl.experiment.spec import Experiment, ExperimentError, fit_args, finished, resume_args, run_dir


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

