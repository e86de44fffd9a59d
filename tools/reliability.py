"""Run the fault suite and write docs/RELIABILITY.md from the cases that passed.

    python tools/reliability.py [--out docs/RELIABILITY.md] [pytest args...]

The suite: tests/test_faults.py (golden runs, SIGKILL at every fault point, two kills, corrupt and missing
checkpoints, bad data, NaN losses and rewards, a failing disk), tests/test_preempt.py (SIGUSR1, SIGTERM and
Ctrl-C, with and without Slurm), tests/test_exact.py (the default conf under a CPU load, SIGKILL at seeded
random moments), tests/test_http_teacher.py (a teacher endpoint that fails: retries, refusals, one that goes away
mid-phase) and, with the smol extra installed, tests/test_real_model.py (SmolLM2-135M killed mid-plan, at
the points of STAGEWISE_REAL_MODEL_KILLS). Each passing case adds a row; data lost is the sum over the rows (0
expected). The slow marker is selected here (pyproject's addopts deselect it); a -m among the pytest args replaces
that selection. CPU only, about 20 minutes on 2 cores. Exits with pytest's code.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from stagewise_pl.models.packaged import INSTALL, PACKAGED

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"), help="where the table goes")
    args, rest = parser.parse_known_args()
    env = dict(os.environ, STAGEWISE_RELIABILITY_OUT=str(Path(args.out).resolve()))
    env.setdefault("STAGEWISE_KILL_SEEDS", "0,1")  # tests/test_exact.py: two seeded runs of random kills (CI: one)
    # tests/test_real_model.py: kills of the real model (CI: none)
    env.setdefault("STAGEWISE_REAL_MODEL_KILLS", "step:grpo:1,checkpoint:bridge:1")
    marks = [] if "-m" in rest else ["-m", "not gpu and not vllm and not slurm and not browser"]
    real = ["tests/test_real_model.py"] if importlib.util.find_spec(PACKAGED["smollm2-135m"].package) else []
    if not real:
        print(f"the real-model kill cases are left out: {INSTALL} adds them", file=sys.stderr)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *marks, "tests/test_faults.py",
               "tests/test_preempt.py", "tests/test_exact.py", "tests/test_http_teacher.py", *real, *rest]
    code = subprocess.call(command, cwd=ROOT, env=env)
    print(f"reliability table: {args.out}" if Path(args.out).is_file() else "no table written (no case passed)")
    return code


if __name__ == "__main__":
    sys.exit(main())
