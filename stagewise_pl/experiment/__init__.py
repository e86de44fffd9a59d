"""The Claim experiment: arms x seeds at equal budgets, one table and its plots.

    python -m stagewise_pl.experiment [--quick] [run.dir=PATH] [--arms a,b] [--seeds 0,1,2] [--jobs N]
    python -m stagewise_pl.experiment --slurm [--time HH:MM:SS] [--partition P] [run.dir=PATH]
    python -m stagewise_pl.experiment --report run.dir=PATH
    python -m stagewise_pl.experiment --dry-run [--quick]

Reads ``conf/experiments/experiment.yaml`` (``--conf PATH`` for another): a base conf, the overrides of every arm, the
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

The package: :mod:`~stagewise_pl.experiment.spec` (the file, the arms, their command lines),
:mod:`~stagewise_pl.experiment.launch` (running them here or on Slurm), :mod:`~stagewise_pl.experiment.results`
(the table and the plots, drawn by :mod:`stagewise_pl.plots` like a run's report).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from stagewise_pl.config import EXPERIMENTS_DIR, available_experiments, experiment_file
from stagewise_pl.experiment.launch import run_local, submit_slurm
from stagewise_pl.experiment.results import write_results
from stagewise_pl.experiment.spec import (Arm, Experiment, ExperimentError, allot, check_configs, finished, fit_args,
                                          load_experiment, resume_args, run_dir)
from stagewise_pl.plots import PlotError

__all__ = ["Arm", "Experiment", "ExperimentError", "allot", "check_configs", "finished", "fit_args",
           "load_experiment", "main", "resume_args", "run_dir", "write_results"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise_pl.experiment", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help="run.dir=PATH: the experiment's directory "
                                                    "(default runs/experiment[-quick])")
    parser.add_argument("--conf", default=str(EXPERIMENTS_DIR / "experiment.yaml"),
                        help="the experiment file: a path, or a name in conf/experiments/ (experiment_skills)")
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
        path = experiment_file(args.conf)
        if path is None:
            raise ExperimentError(f"--conf {args.conf}: no such experiment file; in {EXPERIMENTS_DIR}: "
                                  + ", ".join(available_experiments()))
        exp = load_experiment(path, args.quick)
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
    except (ExperimentError, PlotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

