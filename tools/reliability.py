"""Run the fault suite and write docs/RELIABILITY.md from the cases that passed.

    python tools/reliability.py [--out docs/RELIABILITY.md] [pytest args...]

The suite: tests/test_faults.py (golden runs, SIGKILL at every fault point, two kills, corrupt and missing
checkpoints, bad data, NaN losses and rewards, a failing disk), tests/test_preempt.py (SIGUSR1, SIGTERM and
Ctrl-C, with and without Slurm), tests/test_exact.py (the default conf under a CPU load, SIGKILL at seeded
random moments), tests/test_http_teacher.py (a teacher endpoint that fails: retries, refusals, one that goes away
mid-phase) and, with the smol extra installed, tests/test_real_model.py (SmolLM2-135M killed mid-plan, at
the points of STAGEWISE_REAL_MODEL_KILLS); then, where the vLLM environment of .ci/run_vllm exists
(STAGEWISE_VLLM_VENV, default ~/.cache/stagewise_pl/venv-vllm), tests/vllm_engine/test_vllm_faults.py in it (the
vLLM engine dying and killed mid-rollout). Each passing case adds a row; data lost is the sum over the rows (0
expected). The slow marker is selected here (pyproject's addopts deselect it); a -m among the pytest args replaces
that selection. CPU only, about 30 minutes on 2 cores. Exits with the first failing session's code.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from stagewise_pl.models.packaged import INSTALL, PACKAGED

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"), help="where the table goes")
    args, rest = parser.parse_known_args()
    env = dict(os.environ)
    env.pop("STAGEWISE_RELIABILITY_OUT", None)  # the table is written here, from every session's rows
    env.setdefault("STAGEWISE_KILL_SEEDS", "0,1")  # tests/test_exact.py: two seeded runs of random kills (CI: one)
    # tests/test_real_model.py: kills of the real model (CI: none)
    env.setdefault("STAGEWISE_REAL_MODEL_KILLS", "step:grpo:1,checkpoint:bridge:1")
    marks = [] if "-m" in rest else ["-m", "not gpu and not vllm and not slurm and not browser"]
    real = ["tests/test_real_model.py"] if importlib.util.find_spec(PACKAGED["smollm2-135m"].package) else []
    if not real:
        print(f"the real-model kill cases are left out: {INSTALL} adds them", file=sys.stderr)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *marks, "tests/test_faults.py",
               "tests/test_preempt.py", "tests/test_exact.py", "tests/test_http_teacher.py", *real, *rest]
    sessions = [(command, {})]
    venv = Path(os.environ.get("STAGEWISE_VLLM_VENV", Path.home() / ".cache" / "stagewise_pl" / "venv-vllm"))
    if (venv / "bin" / "python").is_file():
        sessions.append(([str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "vllm",
                          "tests/vllm_engine/test_vllm_faults.py"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}))
    else:
        print(f"the vLLM engine's fault cases are left out: no environment at {venv} (.ci/run_vllm builds it)",
              file=sys.stderr)
    code, rows, failed, collected = 0, [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (cmd, extra) in enumerate(sessions):
            out = Path(tmp) / f"rows-{i}.json"
            result = subprocess.call(cmd, cwd=ROOT, env=dict(env, STAGEWISE_RELIABILITY_ROWS=str(out), **extra))
            code = code or result
            if out.is_file():
                got = json.loads(out.read_text())
                rows, failed, collected = rows + got["rows"], failed + got["failed"], collected + got["collected"]
    if rows:
        sys.path.insert(0, str(ROOT / "tests"))
        from reliability_table import render

        Path(args.out).write_text(render(rows, failed=failed, collected=collected))
        print(f"reliability table: {args.out}")
    else:
        print("no table written (no case passed)")
    return code


if __name__ == "__main__":
    sys.exit(main())
