"""Slurm array submission: the rendered sbatch script, run here by bash with a stand-in srun (no cluster):
one run directory per task, resume from a checkpoint, USR1 passed on to the run (which checkpoints and
requeues itself), status from run directories."""
import json
import os
import signal
import subprocess
import threading
import sys
from pathlib import Path

import pytest

from stagewise_pl.slurm import main


def slurm(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "stagewise_pl.slurm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_dry_run_renders_one_task_per_seed_and_sweep_value(tmp_path):
    out = slurm("submit", "conf=default", "eval.k=0", "--array", "seed=0,1",
                "--sweep", "bridge.strategy=raw,student_rewrite", "--nodes", "2", "--gpus-per-node", "4",
                "--time", "01:30:00", "--root", tmp_path, "--name", "x", "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout.split("# task 0:")[0]
    assert "#SBATCH --array=0-3" in script and "#SBATCH --signal=USR1@120" in script and "--open-mode=append" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script and "--gpus-per-node=4" in script
    dirs = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("# task ")]
    assert len(dirs) == 4 == len(set(dirs))  # array tasks never share a run directory
    for i, (seed, strategy) in enumerate([(0, "raw"), (0, "student_rewrite"), (1, "raw"), (1, "student_rewrite")]):
        line = next(ln for ln in script.splitlines() if ln.startswith(f"  {i}) "))
        assert f"run.seed={seed}" in line and f"bridge.strategy={strategy}" in line and f"run.dir={dirs[i]}" in line
        assert "trainer.num_nodes=2" in line and "trainer.devices=4" in line and "trainer.strategy=ddp" in line
    assert "srun " in script and "resume=last" in script and 'kill -USR1 "$CHILD"' in script
    path = tmp_path / "s.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


@pytest.mark.parametrize("args,message", [
    (["--time", "90"], "--time '90'"), (["--array", "lr=1,2"], "runs over seeds"),
    (["--sweep", "optim.lr"], "expected key=v1,v2"), (["optim.nope=1"], "task 0: .*optim.nope"),
    (["trainer.accelerator=gpu"], "trains on GPUs .* pass --gpus-per-node N"),
])
def test_bad_submissions_exit_2_naming_the_problem(tmp_path, args, message):
    import re

    out = slurm("submit", "conf=default", *args, "--root", tmp_path, "--dry-run")
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr


def test_a_gpu_recipe_needs_gpus_per_node(tmp_path):
    """conf/qwen1.5b.yaml trains on a GPU: without --gpus-per-node Slurm would start it with none (refused, exit
    2); with it, the script asks for them."""
    out = slurm("submit", "conf=qwen1.5b", "--root", tmp_path, "--dry-run")
    assert out.returncode == 2 and "--gpus-per-node" in out.stderr, out.stderr
    out = slurm("submit", "conf=qwen1.5b", "--gpus-per-node", "1", "--root", tmp_path, "--dry-run")
    assert out.returncode == 0 and "#SBATCH --gpus-per-node=1" in out.stdout, out.stderr


def fake_tools(directory: Path) -> dict:
    """srun runs its command as is; scontrol records its arguments."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (directory / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {directory}/scontrol.calls\n')
    for tool in ("srun", "scontrol"):
        (directory / tool).chmod(0o755)
    return dict(os.environ, PATH=f"{directory}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slow  # three runs through the sbatch script
def test_the_script_runs_a_task_resumes_it_and_requeues_on_usr1(tmp_path, fast_overrides):
    root = tmp_path / "runs"
    out = slurm("submit", "conf=default", *fast_overrides, "eval.before=false", "--array", "seed=0,1",
                "--root", root, "--name", "t", "--dry-run")
    assert out.returncode == 0, out.stderr
    script = tmp_path / "t.sbatch"
    script.write_text(out.stdout.split("# task 0:")[0])
    env = fake_tools(tmp_path / "bin")
    task = dict(env, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77", SLURM_JOB_ID="78")
    first = subprocess.run(["bash", str(script)], env=task, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = root / "t" / "001-seed1"
    assert json.loads((run_dir / "state.json").read_text())["finished"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (root / "t" / "000-seed0").exists()
    again = subprocess.run(["bash", str(script)], env=task, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout  # found last.ckpt: resume=last

    # USR1 to the batch shell while its task runs: passed on to the run, which checkpoints, requeues its array
    # task and exits 128 + 10; run again (as the requeued task), the script resumes it to the end
    task0 = dict(task, SLURM_ARRAY_TASK_ID="0")
    shell = subprocess.Popen(["bash", str(script)], env=task0, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    out, err, training = [], [], threading.Event()

    def read(stream, lines) -> None:  # the run says when its first phase starts: the batch shell's trap is in place
        for line in stream:
            lines.append(line)
            if "phase 1-sft: sft" in line:
                training.set()

    readers = [threading.Thread(target=read, args=a, daemon=True) for a in ((shell.stdout, out), (shell.stderr, err))]
    for reader in readers:
        reader.start()
    assert training.wait(timeout=600), "the run never started training"
    shell.send_signal(signal.SIGUSR1)
    shell.wait(timeout=600)
    for reader in readers:
        reader.join(timeout=60)
    stdout, stderr = "".join(out), "".join(err)
    assert shell.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "USR1: passed on to the run" in stdout and "requeue: job 77_0 requeued" in stdout
    assert (tmp_path / "bin" / "scontrol.calls").read_text().split() == ["requeue", "77_0"]
    run0 = root / "t" / "000-seed0"
    assert (run0 / "checkpoints" / "last.ckpt").is_file()
    assert not json.loads((run0 / "state.json").read_text()).get("finished")
    requeued = subprocess.run(["bash", str(script)], env=task0, capture_output=True, text=True, timeout=600)
    assert requeued.returncode == 0 and "resuming from" in requeued.stdout, requeued.stderr[-3000:]
    assert json.loads((run0 / "state.json").read_text())["finished"]


def test_status_reads_the_run_directories(tmp_path, capsys):
    run = tmp_path / "runs" / "s" / "000-seed0"
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"completed": {"1-sft": {}}, "finished": True}))
    manifest = {"job_id": "5", "tasks": {"0": {"run_dir": str(run)}, "1": {"run_dir": str(tmp_path / "none")}}}
    (tmp_path / "runs" / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["status", "--root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "s: job 5" in out and "0: finished (1 phases done, last 1-sft)" in out and "1: not started" in out
