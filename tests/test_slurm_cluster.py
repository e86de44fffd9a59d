"""Against a real one-node Slurm (marker slurm; .ci/run_slurm starts it with tools/slurm/start_local_slurm.sh):
a 2-task array of a tiny plan finishes with complete run directories; a task requeued mid-run
(scontrol requeue) resumes from its checkpoint and ends with the weights of an uninterrupted run; a task
sent USR1 (as before its time limit) checkpoints, requeues itself, resumes and ends with those weights too."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

TINY = ["model.warmup.steps=20", "model.warmup.batch_size=16", "task.train_per_level=40", "task.test_per_level=4",
        "eval.k=0", "eval.batch_size=32", "trainer.batch_size=8", "trainer.checkpoint_every_n_steps=2",
        "run.progress_bar=false", "eval.before=false", "run.deterministic=true", "optim.warmup_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sbatch") is None:
        pytest.fail("no Slurm here: run tools/slurm/start_local_slurm.sh first (.ci/run_slurm does)")


def submit(root: Path, name: str, overrides: list[str], seeds: str) -> str:
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.slurm", "submit", "conf=default", *overrides,
                          "--array", seeds, "--cpus-per-task", "1", "--time", "00:20:00", "--root", str(root),
                          "--name", name], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads((root / name / "manifest.json").read_text())["job_id"]


def states(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.split()


def wait_done(job: str, timeout: float = 900) -> None:
    end = time.time() + timeout
    while states(job):
        assert time.time() < end, f"job {job} still {states(job)}"
        time.sleep(2)


def test_an_array_runs_every_task_in_its_own_run_directory(tmp_path):
    root = tmp_path / "slurm"
    job = submit(root, "a", TINY + [f"model.cache_dir={tmp_path / 'cache'}", "phases=[{kind: sft, steps: 4}]"],
                 "seed=0,1")
    wait_done(job)
    for seed in (0, 1):
        run = root / "a" / f"00{seed}-seed{seed}"
        state = json.loads((run / "state.json").read_text())
        assert state["finished"] and (run / "final" / "model.safetensors").is_file(), (run / "state.json").read_text()
        assert state["completed"]["1-sft"]["steps"] == 4
    status = subprocess.run([sys.executable, "-m", "stagewise_pl.slurm", "status", "--root", str(root)],
                            capture_output=True, text=True)
    assert status.stdout.count("finished") == 2


def test_a_requeued_task_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    from helpers import fit, same_weights

    overrides = TINY + [f"model.cache_dir={tmp_path / 'cache'}", "phases=[{kind: sft, steps: 60, lr: 5e-4}]"]
    straight = tmp_path / "straight"
    assert fit(overrides + [f"run.dir={straight}"]).returncode == 0  # also builds the base model
    root = tmp_path / "slurm"
    job = submit(root, "r", overrides, "seed=0")
    run = root / "r" / "000-seed0"
    end = time.time() + 600
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert time.time() < end and states(job), "the task never checkpointed"
        time.sleep(0.2)
    assert subprocess.run(["scontrol", "requeue", f"{job}_0"]).returncode == 0
    wait_done(job)
    log = next((root / "r" / "logs").glob("*_0.out")).read_text()
    assert "resuming from" in log, log[-3000:]
    assert json.loads((run / "state.json").read_text())["finished"]
    assert same_weights(straight / "final", run / "final")


def test_usr1_makes_a_task_checkpoint_requeue_itself_and_finish_like_an_uninterrupted_one(tmp_path):
    from helpers import fit, same_weights

    overrides = TINY + [f"model.cache_dir={tmp_path / 'cache'}", "phases=[{kind: sft, steps: 60, lr: 5e-4}]",
                        "trainer.checkpoint_every_n_steps=1000"]  # no periodic checkpoint: only the signal's
    straight = tmp_path / "straight"
    assert fit(overrides + [f"run.dir={straight}"]).returncode == 0
    root = tmp_path / "slurm"
    job = submit(root, "u", overrides, "seed=0")
    run = root / "u" / "000-seed0"
    end = time.time() + 600
    logs = root / "u" / "logs"
    while not any("phase 1-sft: sft" in f.read_text() for f in logs.glob("*_0.out")):  # training has started
        assert time.time() < end and states(job), "the task never started training"
        time.sleep(0.2)
    # as --signal=USR1@120 does before the time limit: the signal goes to the task's steps (the run)
    assert subprocess.run(["scancel", "--signal=USR1", f"{job}_0"]).returncode == 0
    wait_done(job)
    log = next((root / "u" / "logs").glob("*_0.out")).read_text()
    assert "stopped by SIGUSR1" in log and "requeued" in log and "resuming from" in log, log[-3000:]
    assert json.loads((run / "state.json").read_text())["finished"]
    assert same_weights(straight / "final", run / "final")


def test_an_experiment_fans_out_as_one_array_task_per_arm_and_seed_then_reports(tmp_path):
    """python -m stagewise_pl.experiment --slurm: the array's tasks are the arms x seeds, each in its own run
    directory; the report job waits for the array and writes the results table and plots."""
    conf = tmp_path / "e.yaml"
    overrides = TINY + [f"model.cache_dir={tmp_path / 'cache'}"]
    conf.write_text(json.dumps({
        "base": "default", "seeds": [0, 1], "budget": {"optimizer_steps": 4, "generated_tokens": 2000},
        "overrides": overrides, "arms": {
            "rl": {"title": "RL", "phases": [{"name": "g", "kind": "grpo", "share": 1}]}}}))
    root = tmp_path / "exp"
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.experiment", "--slurm", "--conf", str(conf),
                          "--cpus-per-task", "1", "--time", "00:20:00", f"run.dir={root}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["tasks"]) == 2 and manifest["report_job"]
    wait_done(manifest["job_id"])
    wait_done(manifest["report_job"])
    for seed in (0, 1):
        assert json.loads((root / "rl" / f"seed-{seed}" / "state.json").read_text())["finished"]
    results = json.loads((root / "results.json").read_text())
    assert [a["seeds_done"] for a in results["arms"].values()] == [[0, 1]]
    assert all((root / name).is_file() for name in results["plots"])
