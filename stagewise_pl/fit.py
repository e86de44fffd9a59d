"""Entry point: ``python -m stagewise_pl.fit [conf=NAME] [key=value ...]``. See ``--help``."""
from __future__ import annotations

import sys
from pathlib import Path

from stagewise_pl.cli import help_text, parse_args
from stagewise_pl.config import ConfigError, load_config, to_yaml
from stagewise_pl.io import WriteError
from stagewise_pl.runlock import RunLocked

MISSING_FILES_EXIT = 4  # --dry-run: a file the run reads is missing (each named with where to get it)
LOCKED_EXIT = 5  # another launch holds the run directory (its pid and host named)
WRITE_EXIT = 6  # the disk refused a write (full, over quota, read-only): the file is named
TEACHER_EXIT = 7  # the teacher's endpoint answered nothing after its retries (named, without its key)
ENGINE_EXIT = 8  # the rollout engine (vLLM's engine core) died or failed in a generation call


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(help_text())
        return 0
    from stagewise_pl.preempt import SignalWatch

    with SignalWatch():  # a signal from here on stops the run after a step, with a checkpoint
        return _main(args)


def _main(args) -> int:
    try:
        cfg = load_config(args.conf, args.overrides)
        from stagewise_pl.logging import quiet_third_party
        from stagewise_pl.preflight import (check_teaching, how_to_get, plan_phases, plan_traits,
                                           referenced_datasets, referenced_files)
        from stagewise_pl.run import Run

        quiet_third_party()

        if args.dry_run:
            from stagewise_pl.plan import describe

            from stagewise_pl.memory import describe as memory

            phases = plan_phases(cfg)
            check_teaching(cfg, phases)
            print(to_yaml(cfg) + "\nplan:\n" + "\n".join(f"  {line}" for line in describe(phases, plan_traits(phases))))
            missing = []
            for what, path, exists in referenced_files(cfg, phases):
                print(f"file {what}: {path} " + ("(found)" if exists else "(MISSING: the run stops at set-up)"))
                if not exists:
                    missing.append(f"  {path} ({what}): {how_to_get(what, path, cfg)}")
            for what, where in referenced_datasets(cfg):
                print(f"dataset {what}: {where}")
            if cfg.data.source != "synthetic" and Path(cfg.data.path).expanduser().exists():
                from stagewise_pl.data.loaders import load_pool

                print(f"training pool: {load_pool(cfg.data)[1].summary()}")  # bad rows stop the dry run too
            print("\n".join(memory(cfg)))
            if missing:
                print(f"error: {len(missing)} file(s) the run needs are missing; where to get each:\n"
                      + "\n".join(missing), file=sys.stderr)
                return MISSING_FILES_EXIT
            return 0
        Run(cfg).execute()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return LOCKED_EXIT
    except WriteError as exc:
        print(f"error: {exc}. What the run wrote before it is intact: free space (or make the filesystem "
              f"writable) and resume=last", file=sys.stderr)
        return WRITE_EXIT
    except Exception as exc:
        from stagewise_pl.data.hub import HubError
        from stagewise_pl.data.problems import BadRowError

        if isinstance(exc, (BadRowError, FileNotFoundError, HubError)):  # bad or missing data: where, and why
            print(f"error: data: {exc}", file=sys.stderr)
            return 2
        from stagewise_pl.nonfinite import NonFiniteError
        from stagewise_pl.preempt import Preempted
        from stagewise_pl.checkpoints import CheckpointError

        if isinstance(exc, Preempted):  # checkpointed (and requeued under Slurm): 128 + the signal's number
            print(f"stopped: {exc}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, (NonFiniteError, CheckpointError)):
            print(f"error: {exc}", file=sys.stderr)
            return 3
        from stagewise_pl.teachers.base import TeacherUnavailable

        if isinstance(exc, TeacherUnavailable):
            print(f"error: the teacher did not answer: {exc}. The run stopped; its last checkpoint and the answers "
                  f"received so far (the teacher's disk cache) are kept: resume=last when the endpoint answers "
                  f"again asks for none of them twice", file=sys.stderr)
            return TEACHER_EXIT
        from stagewise_pl.rollout.base import EngineFailed

        if isinstance(exc, EngineFailed):
            print(f"error: {exc}. The run stopped; its last checkpoint is kept: resume=last starts a new engine and "
                  f"goes on from it", file=sys.stderr)
            return ENGINE_EXIT
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
