"""Stopping on a signal: SIGUSR1 / SIGTERM / Ctrl-C at a step make the run checkpoint that step and exit with
128 + the signal; under Slurm (SLURM_JOB_ID set) it also asks scontrol to requeue its job (a stand-in scontrol
records the call); the resumed run ends with the weights of an uninterrupted one."""
import os
import signal
import stat

import pytest
import torch

from helpers import fit, same_weights

STEPS = 6  # checkpoint_every_n_steps=3 in fast_overrides: step 4 is not a periodic checkpoint


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    from conftest import fast

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = fit(fast(cache_dir) + ["eval.before=false", "eval.k=0", f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def fake_scontrol(directory, code=0):
    directory.mkdir(exist_ok=True)
    script = directory / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{directory}/calls"\nexit {code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


def position(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PhaseManager"]
    return state["phase"], state["runner"]["position"]


@pytest.mark.slow  # ~30 s each (the fast tier stays within 8 minutes; tests/test_fit.py resumes in the fast tier)
@pytest.mark.parametrize("name,slurm", [("USR1", True), ("TERM", True), ("TERM", False), ("INT", False)])
def test_a_signal_checkpoints_the_step_requeues_under_slurm_and_the_run_resumes(tmp_path, monkeypatch, fast_overrides,
                                                                               straight, reliability, name, slurm):
    args = fast_overrides + ["eval.before=false", "eval.k=0", f"run.dir={tmp_path / 'run'}"]
    env = dict(fake_scontrol(tmp_path / "bin"), STAGEWISE_FAULT="step:1-sft:4", STAGEWISE_FAULT_SIGNAL=name)
    if slurm:
        env.update(SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2")
    else:
        for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
            monkeypatch.delenv(key, raising=False)
    out = fit(args, env)
    signum = getattr(signal, f"SIG{name}")
    assert out.returncode == 128 + signum, out.stderr[-3000:]
    assert f"stopped by SIG{name} after phase 1-sft step 4" in out.stderr
    assert position(tmp_path / "run") == (0, 4)  # the step in progress is kept, not only the periodic step 3
    calls = tmp_path / "bin" / "calls"
    if slurm:
        assert calls.read_text().split() == ["requeue", "4240_2"]
        assert "requeued" in out.stdout
    else:
        assert not calls.exists()
    resumed = fit(args + ["resume=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 4" in resumed.stdout
    assert same_weights(straight / "final", tmp_path / "run" / "final")
    reliability(f"SIG{name} mid-run" + (" under Slurm (SLURM_JOB_ID set)" if slurm else " outside Slurm"),
                f"signal:{name}",
                "checkpoint of the step in progress, " + ("scontrol requeue called, " if slurm else "")
                + f"exit {128 + signum}; the resumed run ends with the uninterrupted run's weights", 0)


@pytest.mark.slow  # two runs
def test_a_failed_requeue_is_said_and_the_checkpoint_stays(tmp_path, fast_overrides, reliability):
    args = fast_overrides + ["eval.before=false", "eval.k=0", f"run.dir={tmp_path / 'run'}"]
    env = dict(fake_scontrol(tmp_path / "bin", code=1), STAGEWISE_FAULT="step:1-sft:2", STAGEWISE_FAULT_SIGNAL="USR1",
               SLURM_JOB_ID="77")
    out = fit(args, env)
    assert out.returncode == 128 + signal.SIGUSR1
    assert "scontrol requeue 77 failed" in out.stdout and "resume it with resume=last" in out.stdout
    assert position(tmp_path / "run") == (0, 2)
    reliability("SIGUSR1 under Slurm when scontrol requeue fails", "signal:USR1", "said in the log; the checkpoint "
                "of the step stays; exit 138", 0)
