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
