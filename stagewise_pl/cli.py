"""Command-line parsing shared by the entry points: ``conf=NAME``, ``resume=...``, ``a.b=value`` and flags."""
from __future__ import annotations

from dataclasses import dataclass, field

from stagewise_pl.config import GROUPS, available_confs, describe


@dataclass
class Args:
    conf: str = "default"
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    dry_run: bool = False


def parse_args(argv: list[str]) -> Args:
    args = Args()
    for item in argv:
        if item in ("-h", "--help"):
            args.help = True
        elif item == "--dry-run":
            args.dry_run = True
        elif item.startswith("conf="):
            args.conf = item.split("=", 1)[1]
        elif item.startswith("resume="):
            args.overrides.append("run." + item)
        elif item.startswith("-"):
            raise SystemExit(f"unknown flag {item!r}; see --help")
        else:
            args.overrides.append(item)
    return args


USAGE = """usage: python -m stagewise_pl.fit [conf=NAME] [resume=last|PATH] [group.key=value ...] [--dry-run] [--help]

Runs the plan of conf/NAME.yaml (default: the embedded CPU run: tiny model, synthetic task).
  conf=NAME          a file in conf/ (or a path to a .yaml file); a file with 'extends: OTHER' is OTHER's settings
                     with its own merged over them (mappings key by key, lists such as phases replaced whole)
  resume=last        continue run.dir (or the newest runs/<conf>-*) from its last checkpoint
  resume=PATH        continue from a given Lightning checkpoint
  group.key=value    override any key below, e.g. optim.lr=3e-4 trainer.packing=true
  --dry-run          resolve and check the configuration, print it, the plan, the files it reads and a memory
                     estimate, and exit
exit codes: 0 done; 2 a bad configuration, argument or training data (the message names it); 3 a non-finite loss
  or a checkpoint that cannot be used; 4 (--dry-run) a file the run reads is missing (with where to get it);
  5 another launch is running on run.dir (its pid and host named); 6 the disk refused a write (full, read-only;
  the file named, what was written before intact: free space and resume=last); 7 the teacher's endpoint answered
  nothing after its retries (named; its answers so far are cached); 8 the rollout engine (vLLM) died in a
  generation call (resume=last starts a new one); 128 + N stopped by signal N after a checkpoint (requeued under
  Slurm)
"""


def help_text() -> str:
    lines = [USAGE, f"confs: {', '.join(available_confs())}", "", "config groups (" + ", ".join(GROUPS) + "):"]
    lines += describe()
    return "\n".join(lines)
