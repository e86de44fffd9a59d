"""What the bench scripts share: a measurement in a fresh process, reported back as one JSON line."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

MARK = "RESULT "
ROOT = Path(__file__).resolve().parent.parent  # the checkout whose stagewise_pl the children measure


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB.

    On Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` is not the process's own: across fork and exec it keeps the
    parent's resident size at the fork, so a child of a bench that had loaded a model reported the parent's peak.
    ``VmHWM`` in /proc/self/status is the high-water mark of this process's own memory map (new at exec); the
    rusage figure is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict) -> None:
    """In the child: print the result (with this process's peak RSS in MB) for :func:`run_child`."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(MARK + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], env: dict | None = None, python: str | None = None) -> dict:
    """Run ``python script args`` in a fresh process (another interpreter if given) and return its report.

    The child imports stagewise_pl from this checkout, whatever the interpreter has installed (another interpreter,
    such as vLLM's own environment, may hold an editable install of a clone elsewhere, or none)."""
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    out = subprocess.run([python or sys.executable, script, *args], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {}), PYTHONPATH=path))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if out.returncode or not lines:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def bench_parser(doc: str, steps: int, repeats: int = 3) -> argparse.ArgumentParser:
    """The options every step bench takes: --repeats, --steps, --json, --model, and the hidden child mode."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    add_model_option(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    return parser


def add_model_option(parser: argparse.ArgumentParser) -> None:
    from stagewise_pl.models.packaged import INSTALL

    parser.add_argument("--model", default="tiny",
                        help=f"tiny (the locally built tiny model, the default) or a real model packaged for pip: "
                             f"smollm2-135m ({INSTALL}; converted once into the model cache)")


def real_model(name: str) -> Path:
    """The converted checkpoint of a packaged model (``--model smollm2-135m``), in the default model cache; exits
    with the install command when the package is missing. A checkpoint directory is itself (what a parent passes
    to a child that runs in another environment, without the package)."""
    from stagewise_pl.config import ConfigError, default_cache_dir
    from stagewise_pl.models.packaged import is_packaged, packaged_model

    if (Path(name) / "config.json").is_file():
        return Path(name)
    if not is_packaged(name):
        raise SystemExit(f"--model {name}: not a packaged model (tiny, smollm2-135m, or a path to a .gguf file)")
    try:
        return packaged_model(name, default_cache_dir(), log=lambda *a: print(*a, file=sys.stderr))
    except ConfigError as exc:
        raise SystemExit(f"--model {name}: {exc}") from None


def bench_model(name: str, cfg, task) -> Path:
    """``--model``'s checkpoint: the default run's tiny base model (built and cached if missing) for ``tiny``,
    else :func:`real_model`."""
    from stagewise_pl.phases.warmup import tiny_base_model

    return tiny_base_model(cfg, task, log=lambda *a: print(*a, file=sys.stderr)) if name == "tiny" else real_model(name)


def interleave(variants: list[str], repeats: int, measure: Callable[[str], dict]) -> dict[str, list[dict]]:
    """Each repeat measures every variant once, in order (a, b, a, b, ...), so slow drift in the machine's
    speed spreads over all of them; progress goes to stderr."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants:
            runs[v].append(measure(v))
            print(f"repeat {r + 1}/{repeats} {v}: {runs[v][-1]}", file=sys.stderr)
    return runs
