"""One launch per run directory (stagewise_pl/runlock.py): a second launch is refused naming the first's pid and
host; a lock left by a killed process is taken over, and the log says so."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

HOLD = ("import sys, time; from stagewise_pl.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)")


def holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    from stagewise_pl.runlock import RunLock, RunLocked

    proc = holder(tmp_path)
    try:
        with pytest.raises(RunLocked, match=f"pid {proc.pid} on host {socket.gethostname()}") as err:
            RunLock(tmp_path).acquire()
        assert f"kill -TERM {proc.pid}" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said = []
    lock = RunLock(tmp_path, said.append).acquire()  # the file is still there, its flock went with the process
    assert said and f"stale lock, left by pid {proc.pid}" in said[0]
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    said.clear()
    with RunLock(tmp_path, said.append):  # a clean end leaves nothing to take over
        assert said == []


def test_a_launch_on_a_directory_in_use_exits_5_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    try:
        out = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", f"run.dir={run_dir}", "run.progress_bar=false"],
                             capture_output=True, text=True, timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert out.returncode == 5, out.stderr[-2000:]
    assert f"is in use by another launch: pid {proc.pid} on host {socket.gethostname()}" in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]


def test_an_engine_that_fails_in_a_rollout_stops_the_run_with_its_own_exit_code(tmp_path, fast_overrides,
                                                                                 monkeypatch, capsys):
    """The exit and the message a dead rollout engine gives (the vLLM engine raises EngineFailed: its own tests,
    tests/vllm_engine/test_vllm_faults.py, kill it for real and resume); the last checkpoint is kept."""
    from stagewise_pl.fit import ENGINE_EXIT, main
    from stagewise_pl.rollout.base import EngineFailed
    from stagewise_pl.rollout.hf import HFEngine

    calls = []
    original = HFEngine.generate

    def dies_on_the_second_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise EngineFailed("the vLLM engine failed while generating (g: 4 prompts x 4): EngineDeadError: gone")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HFEngine, "generate", dies_on_the_second_call)
    run_dir = tmp_path / "run"
    assert main(fast_overrides + [f"run.dir={run_dir}", "eval.k=0", "eval.before=false",
                                  "phases=[{name: g, kind: grpo, steps: 2, lr: 1e-3}]", "grpo.prompts_per_step=4",
                                  "grpo.num_generations=4", "trainer.checkpoint_every_n_steps=1"]) == ENGINE_EXIT == 8
    err = capsys.readouterr().err
    assert "EngineDeadError: gone. The run stopped; its last checkpoint is kept: resume=last" in err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "run.lock").exists()
