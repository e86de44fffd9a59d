"""Shared fixtures: a tiny configuration that runs the real entry point in seconds, and a tiny model."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Triton kernels run under Triton's CPU interpreter in CPU-only test runs; the variable must be set
# before any kernel is defined (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The vLLM tests run in their own environment (.ci/run_vllm); elsewhere they are not collected.
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm_engine/*"]

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"

torch.set_num_threads(2)

# Every cache a test run makes (the real tiny base model, built once per session by the first test that needs it,
# and teacher answers) goes to a temporary directory of this session, never the user's ~/.cache; the processes
# the tests start inherit it. Removed when the session ends. STAGEWISE_TEST_CACHE_DIR names one to share between
# sessions instead (.ci/run: the fast and slow tiers build the base model once), left for its owner to remove.
SHARED_CACHE = os.environ.get("STAGEWISE_TEST_CACHE_DIR")
SESSION_CACHE = Path(SHARED_CACHE) if SHARED_CACHE else Path(tempfile.mkdtemp(prefix="stagewise-test-cache-"))
SESSION_CACHE.mkdir(parents=True, exist_ok=True)
os.environ["STAGEWISE_CACHE_DIR"] = str(SESSION_CACHE)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tiny-base-model cache for the whole session (the warm-up is built once)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def fast_overrides(cache_dir) -> list[str]:
    """Overrides that make the default conf run through every part in a few seconds."""
    return fast(cache_dir)


def fast(cache_dir) -> list[str]:
    """The overrides of the fast_overrides fixture (for fixtures of a wider scope)."""
    return [
        f"model.cache_dir={cache_dir}", "model.warmup.steps=20", "model.warmup.batch_size=16",
        "task.train_per_level=40", "task.test_per_level=4", "eval.k=2", "eval.batch_size=32",
        "trainer.batch_size=8", "phases=[{kind: sft, steps: 6, lr: 5e-4}]", "trainer.checkpoint_every_n_steps=3",
        "trainer.log_every_n_steps=1", "run.progress_bar=false", "optim.warmup_steps=2",
    ]


@pytest.fixture(scope="session")
def base_overrides():
    """The real tiny base model (warm-up as in the default run, about 2 minutes on 2 cores, built once per
    session in SESSION_CACHE by the first test that needs it). Keep the task and trainer.packing as in
    conf/default.yaml: they are part of the base model's cache key."""
    return ["run.progress_bar=false", "eval.k=0", "trainer.log_every_n_steps=1", "eval.before=false"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny model and its locally trained tokenizer, saved with save_pretrained."""
    from stagewise_pl.config import TinyModelConfig
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level

    task = ArithmeticTask([Level(1, 9), Level(2, 40)], train_per_level=60, test_per_level=5)
    directory = tmp_path_factory.mktemp("tiny") / "model"
    return save_random_tiny(directory, TinyModelConfig(), task, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from stagewise_pl.models.load import load_policy

    return load_policy(str(tiny_model_dir))


def benchmarks_dir() -> Path:
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_BENCHMARKS} (the project's shared/ checkout)")
    return SHARED_BENCHMARKS


# ------------------------------------------------------------------ the reliability table (docs/RELIABILITY.md)
RELIABILITY: list[dict] = []


@pytest.fixture
def reliability(request):
    """``add(case, fault, result, lost=0)``: a row of the reliability table, added once the test's checks passed.
    ``python tools/reliability.py`` runs the fault suite and writes the table to docs/RELIABILITY.md."""
    def add(case: str, fault: str, result: str, lost: int = 0) -> None:
        RELIABILITY.append({"test": request.node.name, "case": case, "fault": fault, "result": result, "lost": lost})
    return add


def pytest_sessionfinish(session, exitstatus):
    if not SHARED_CACHE:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)
    rows = os.environ.get("STAGEWISE_RELIABILITY_ROWS")  # tools/reliability.py: the rows of one of its sessions
    if rows:
        Path(rows).write_text(json.dumps({"rows": RELIABILITY, "failed": session.testsfailed,
                                          "collected": session.testscollected}))
    out = os.environ.get("STAGEWISE_RELIABILITY_OUT")
    if not out or not RELIABILITY:
        return
    from reliability_table import render

    Path(out).write_text(render(RELIABILITY, failed=session.testsfailed, collected=session.testscollected))
