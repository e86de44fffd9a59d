"""What the bench scripts share: a measurement in a fresh process, reported back as one JSON line."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

MARK = "RESULT "


def report(result: dict) -> None:
    """In the child: print the result (with this process's peak RSS in MB) for :func:`run_child`."""
    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(MARK + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], env: dict | None = None, python: str | None = None) -> dict:
    """Run ``python script args`` in a fresh process (another interpreter if given) and return its report."""
    out = subprocess.run([python or sys.executable, script, *args], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if out.returncode or not lines:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])
