"""Nothing lost: a tiny plan (SFT, profile, GRPO, CFT) is golden (bit-identical for a seed), and a run killed at
any of the fault points, twice, with a corrupt or missing checkpoint, a failing disk or non-finite values either
ends exactly as the golden run or stops with an error naming the file -- never a silent fresh start.
Every case adds a row to docs/RELIABILITY.md (python tools/reliability.py)."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import fit, outcome, partial_files, resume

pytestmark = pytest.mark.slow  # the fault matrix: about 12 minutes on 2 cores (.ci/run's second step)

PLAN = ("phases=[{name: s, kind: sft, steps: 4, lr: 5e-4}, {name: p, kind: profile, limit: 40}, "
        "{name: g, kind: grpo, select: medium, steps: 3, lr: 1e-4}, "
        "{name: c, kind: cft, select: unsolved_in_rl, steps: 3, lr: 1e-4}]")
SETTINGS = [PLAN, "profile.k=4", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_new_tokens=24",
            "trainer.batch_size=16", "trainer.checkpoint_every_n_steps=2", "run.deterministic=true",
            "eval.each_phase=false", "bridge.samples=2"]


@pytest.fixture(scope="module")
def args(base_overrides):
    return base_overrides + SETTINGS


@pytest.fixture(scope="module")
def golden(tmp_path_factory, args):
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    out = fit(args + [f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return outcome(run_dir)


# ------------------------------------------------------------------ 1. golden
def test_golden_the_same_seed_is_bit_identical_and_another_seed_differs(tmp_path, args, golden, reliability):
    again = tmp_path / "again"
    assert fit(args + [f"run.dir={again}"]).returncode == 0
    got = outcome(again)
    assert got == golden
    assert golden["ledger_rows"] > 0 and set(golden["curves"]) == {"01-s.json", "03-g.json", "04-c.json"}
    other = tmp_path / "seed1"
    assert fit(args + [f"run.dir={other}", "run.seed=1"]).returncode == 0
    differs = outcome(other)
    assert differs["weights"] != golden["weights"] and differs["ledger"] != golden["ledger"]
    reliability("golden: the plan twice with seed 0", "none", "weights, ledger, curves, summaries, routing identical; "
                "seed 1 differs", 0)


# ------------------------------------------------------------------ 2. SIGKILL at each point
POINTS = {
    "sft_backward#3": "mid SFT step (after backward, before the optimizer step)",
    "decode#60": "mid rollout (a decoding step of the HF engine)",
    "verify#6": "inside a verifier call (pairs sent to a grading worker)",
    "ledger_rename#3": "between a ledger part's write and its rename",
    "phase_end:p": "between the end of a phase and the start of the next",
    "checkpoint_write#3": "during a checkpoint save (written, not yet renamed)",
    "checkpoint_rename#3": "during a checkpoint save (between its two renames)",
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_at_each_point_resumes_to_the_golden_run(tmp_path, args, golden, reliability, point):
    run_dir = tmp_path / "run"
    killed = fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": point})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no handler ran
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not partial_files(run_dir)  # the partial files of the kill were never read, and are gone
    got = outcome(run_dir)
    assert got == golden
    reliability(f"SIGKILL {POINTS[point]}", f"kill:{point}", "resumed; ends as the golden run", 0)


def test_a_kill_before_the_first_checkpoint_is_not_resumed_silently(tmp_path, args, golden, reliability):
    run_dir = tmp_path / "run"
    assert fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "sft_backward#1"}).returncode == -9
    refused = fit(args + [f"run.dir={run_dir}", "resume=last"])
    assert refused.returncode == 2 and "has no checkpoint" in refused.stderr and "resume=restart" in refused.stderr
    out = fit(args + [f"run.dir={run_dir}", "resume=restart"])
    assert out.returncode == 0, out.stderr[-3000:]
    got = outcome(run_dir)
    assert got == golden
    reliability("SIGKILL before the first checkpoint; resume=last", "kill:sft_backward#1",
                "error (exit 2), not a fresh start; resume=restart ends as the golden run", 0)


# ------------------------------------------------------------------ 3. two kills, then a rerun
def test_two_kills_in_a_row_then_a_rerun_after_completion(tmp_path, args, golden, reliability):
    run_dir = tmp_path / "run"
    assert fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "step:g:3"}).returncode == -9
    assert resume(args, run_dir, env={"STAGEWISE_FAULT": "verify#2"}).returncode == -9
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    got = outcome(run_dir)
    assert got == golden
    again = resume(args, run_dir)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert outcome(run_dir) == golden
    reliability("two kills in a row, then a rerun of the finished run", "kill:step:g:3 + kill:verify#2",
                "resumed to the golden run; the rerun is a no-op (exit 0, says so)", 0)


# ------------------------------------------------------------------ 3b. two launches on one run directory
def test_a_second_launch_on_a_running_run_is_refused_and_the_first_ends_as_golden(tmp_path, args, golden,
                                                                                    reliability):
    """A Slurm requeue racing a manual resume: the second launch (resume=last) while the first runs is refused
    (exit 5) naming the first's pid and host, and writes nothing; the first ends as the golden run."""
    import socket
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "stagewise_pl.fit", *args, f"run.dir={run_dir}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the first launch ended before the second could race it"
    second = fit(args + [f"run.dir={run_dir}", "resume=last"])
    stdout, stderr = first.communicate(timeout=1800)
    assert second.returncode == 5, second.stderr[-3000:]
    assert f"in use by another launch: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert first.returncode == 0, stderr[-3000:]
    assert outcome(run_dir) == golden and not (run_dir / "run.lock").exists()
    reliability("a second launch (resume=last) while the run is running", "lock:second-launch",
                "refused (exit 5) naming the first's pid and host; the first ends as the golden run", 0)


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, args, golden, reliability):
    run_dir = tmp_path / "run"
    killed = fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "step:g:2"})
    assert killed.returncode == -9 and (run_dir / "run.lock").is_file()  # SIGKILL: the lock file stays
    left = json.loads((run_dir / "run.lock").read_text())["pid"]
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run.lock: taking over a stale lock, left by pid {left}" in out.stdout
    assert outcome(run_dir) == golden
    reliability("a lock left by a run that was killed", "lock:stale",
                "taken over by the resume, said in its log; ends as the golden run", 0)


# ------------------------------------------------------------------ 4. corrupt or missing checkpoints
def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # flipped bytes in the middle
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:])


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, args):
    """A run killed in its GRPO phase (3 rollout steps), after its checkpoint of step 2: with last.ckpt and
    previous.ckpt."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "step:g:3"}).returncode == -9
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "previous.ckpt").is_file()
    return run_dir


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped"])
def test_a_corrupt_last_checkpoint_is_an_error_naming_it_or_a_fallback_with_a_warning(tmp_path, args, golden,
                                                                                      stopped_run, reliability, how):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    corrupt(last, how)
    refused = fit(args + [f"run.dir={run_dir}", "resume=last"])
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert f"checkpoint {last} is corrupt" in refused.stderr and "run.checkpoint_fallback=true" in refused.stderr
    if how != "flipped":  # the fallback is the same for every kind of corruption: resumed to the end once
        reliability(f"{how} last.ckpt", f"corrupt:{how}", "error naming the file (exit 3)", 0)
        return
    out = fit(args + [f"run.dir={run_dir}", "resume=last", "run.checkpoint_fallback=true"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" in out.stdout and "previous.ckpt" in out.stdout
    got = outcome(run_dir)
    assert got == golden
    reliability(f"{how} last.ckpt", f"corrupt:{how}", "error naming the file (exit 3); with run.checkpoint_fallback: "
                "previous.ckpt with a warning, ends as the golden run", 0)


def test_resume_last_without_any_run_or_checkpoint_is_an_error(tmp_path, args, reliability):
    none = fit(args + [f"run.dir={tmp_path / 'none'}", "resume=last"])
    assert none.returncode == 2 and "holds no run" in none.stderr
    assert not (tmp_path / "none").exists()
    reliability("resume=last on a directory with no run", "missing:run", "error (exit 2); nothing written", 0)


# ------------------------------------------------------------------ 6. non-finite values
def test_a_nan_loss_skips_its_step_and_k_in_a_row_stop_the_run(tmp_path, base_overrides, reliability):
    sft = base_overrides + ["phases=[{name: s, kind: sft, steps: 4, lr: 5e-4}]", "trainer.batch_size=16",
                            "trainer.checkpoint_every_n_steps=1", "run.deterministic=true"]
    one = tmp_path / "one"
    # NaN at step 2; killed after the checkpoint of step 2, so that previous.ckpt (step 1) and last.ckpt remain
    out = fit(sft + [f"run.dir={one}"], {"STAGEWISE_FAULT": "nan_loss:s:2,checkpoint:s:2"})
    assert out.returncode == -9, out.stderr[-3000:]
    before = torch.load(one / "checkpoints" / "previous.ckpt", weights_only=True)
    after = torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert after["callbacks"]["PhaseManager"]["runner"]["nonfinite"] == {"skipped": 1, "in_a_row": 1}
    resumed = fit(sft + [f"run.dir={one}", "resume=last"])
    assert resumed.returncode == 0 and json.loads((one / "state.json").read_text())["completed"]["s"][
        "nonfinite_skipped"] == 1
    reliability("NaN loss at one SFT step", "nan:nan_loss:s:2", "step skipped: parameters and optimizer unchanged, "
                "counted; the run goes on", 0)

    many = tmp_path / "many"
    out = fit(sft + [f"run.dir={many}", "optim.max_nonfinite_steps=3"],
              {"STAGEWISE_FAULT": "nan_loss:s:1,nan_loss:s:2,nan_loss:s:3"})
    assert out.returncode == 3 and "3 optimizer steps in a row" in out.stderr, out.stderr[-3000:]
    assert not (many / "final").exists()
    for name in ("last.ckpt", "previous.ckpt"):
        ckpt = torch.load(many / "checkpoints" / name, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
        assert ckpt["callbacks"]["PhaseManager"]["runner"]["position"] <= 2  # no checkpoint of the third bad step
    reliability("NaN loss at 3 SFT steps in a row (optim.max_nonfinite_steps=3)", "nan:nan_loss:s:1-3",
                "stopped, exit 3, no checkpoint of the bad steps; every checkpoint finite", 0)


def test_a_nan_loss_in_grpo_is_skipped_and_counted(tmp_path, args, reliability):
    run_dir = tmp_path / "run"
    out = fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "nan_loss:g:2"})
    assert out.returncode == 0, out.stderr[-3000:]
    curves = json.loads((run_dir / "curves" / "03-g.json").read_text())
    # the second rollout step that trains is poisoned (a step whose groups are all flat does not count): its update
    # is skipped and counted (the count is the phase's running total), and no other
    trained = [i for i, u in enumerate(curves["updated"]) if u]
    skipped = curves["nonfinite_skipped"]
    assert len(trained) >= 2 and skipped[trained[0]] == 0 and skipped[trained[1]] == skipped[-1] == 1, curves
    reliability("NaN loss in a GRPO update", "nan:nan_loss:g:2", "update skipped and counted; the run finishes", 0)


def test_a_nan_reward_counts_as_zero_and_is_counted(monkeypatch, reliability):
    from stagewise_pl.verify.pool import GradingPool

    tests = str(Path(__file__).parent)  # the worker process imports the plugin by dotted path
    monkeypatch.setenv("PYTHONPATH", f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with GradingPool("verifier_plugins:NaNVerifier", workers=1, timeout_s=5.0) as pool:
        verdicts = pool.score_batch(["nan", "1", "inf", "2"], ["1", "1", "1", "1"])
    assert [v.reward for v in verdicts] == [0.0, 1.0, 0.0, 0.0] and pool.nonfinite == 2
    reliability("a verifier returns NaN / inf rewards", "nan:reward", "counted as 0, counted (pool.nonfinite; "
                "GRPO logs nonfinite_rewards)", 0)


# ------------------------------------------------------------------ 7. disk
@pytest.mark.parametrize("failure", ["rename", "read-only"])
def test_a_failing_disk_while_saving_is_a_clear_error_and_keeps_the_checkpoint_before(tmp_path, base_overrides,
                                                                                  monkeypatch, reliability, failure):
    import errno

    from stagewise_pl import checkpoints
    from stagewise_pl.checkpoints import CheckpointError
    from stagewise_pl.config import load_config
    from stagewise_pl.run import Run

    cfg = load_config("default", base_overrides + ["phases=[{name: s, kind: sft, steps: 4, lr: 5e-4}]",
                                                    "trainer.batch_size=16", "trainer.checkpoint_every_n_steps=2",
                                                    f"run.dir={tmp_path / 'run'}"])
    saves = []
    if failure == "rename":
        real = os.replace

        def replace(src, dst):
            if Path(dst).name == "last.ckpt" and len(saves) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            if Path(dst).name == "last.ckpt":
                saves.append(dst)
            return real(src, dst)

        monkeypatch.setattr(checkpoints.os, "replace", replace)
        message = "No space left on device"
    else:
        from lightning.pytorch.plugins.io.torch_plugin import TorchCheckpointIO

        real_save = TorchCheckpointIO.save_checkpoint

        def save(self, checkpoint, path, storage_options=None):
            if saves:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            saves.append(path)
            return real_save(self, checkpoint, path, storage_options)

        monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", save)
        message = "Read-only file system"
    with pytest.raises(CheckpointError, match=f"cannot write the checkpoint .*last.ckpt: .*{message}"):
        Run(cfg, log=lambda *_: None).execute()
    monkeypatch.undo()
    directory = tmp_path / "run" / "checkpoints"
    chosen = checkpoints.choose(directory, fallback=False, warn=lambda *_: None)
    state = torch.load(chosen, weights_only=True)["callbacks"]["PhaseManager"]
    assert state["phase"] == 0 and state["runner"]["position"] == 2  # the checkpoint before the failed one
    assert not partial_files(tmp_path / "run")
    reliability(f"a {failure} failure while saving a checkpoint", f"disk:{failure}",
                "error naming the file; the checkpoint before it intact and chosen by resume=last", 0)


WRITES = {"enospc:ledger#2": "a ledger part (the profile's)", "enospc:routing#3": "a routing decision (GRPO's)",
          "enospc:g": "the GRPO phase's export", "enospc:curves#2": "a phase's curves file",
          "enospc:final": "the final model's export"}


@pytest.mark.parametrize("point", list(WRITES))
def test_a_full_disk_at_a_write_names_the_file_and_a_resume_after_ends_as_golden(tmp_path, args, golden, reliability,
                                                                                 point):
    """ENOSPC at the write of a ledger part, a routing or curves file, an export: exit 6 naming the file, no partial
    file left, what was written before intact; after space is freed, resume=last ends as the golden run."""
    run_dir = tmp_path / "run"
    full = fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": point})
    assert full.returncode == 6, full.stderr[-3000:]
    assert "No space left on device. What the run wrote before it is intact" in full.stderr
    assert f"cannot write {run_dir}/" in full.stderr and not partial_files(run_dir)
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert outcome(run_dir) == golden
    reliability(f"a full disk writing {WRITES[point]}", f"disk:{point}",
                "error naming the file (exit 6); resumed after, ends as the golden run", 0)


# ------------------------------------------------------------------ 5. bad data
def test_bad_rows_are_counted_per_reason_with_file_and_line_and_good_rows_kept(tmp_path, reliability):
    from stagewise_pl.data.loaders import load_jsonl
    from stagewise_pl.data.problems import BadRowError

    good = [{"id": f"g{i}", "prompt": f"{i}+1", "answer": str(i + 1)} for i in range(40)]
    bad = [("invalid_json", b'{"id": "x1", "prompt": '),
           ("no_answer", json.dumps({"id": "x2", "prompt": "1+1"}).encode()),
           ("no_answer", json.dumps({"id": "x3", "prompt": "1+1", "answer": None}).encode()),
           ("no_prompt", json.dumps({"id": "x4", "prompt": " ", "answer": "2"}).encode()),
           ("row_too_large", json.dumps({"id": "x5", "prompt": "1" * 5_000_000, "answer": "2"}).encode()),
           ("invalid_utf8", b'{"id": "x6", "prompt": "\xff\xfe", "answer": "2"}'),
           ("duplicate_id", json.dumps({"id": "g3", "prompt": "9+9", "answer": "18"}).encode())]
    lines, expected = [], {}
    for i, row in enumerate(good):
        lines.append(json.dumps(row).encode())
        if i % 5 == 4 and bad:
            reason, raw = bad.pop(0)
            lines.append(raw)
            expected.setdefault(reason, []).append(len(lines))
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a BOM and CRLF line ends
    problems, report = load_jsonl(path, on_bad_row="skip", max_bad_fraction=0.5,
                                  fields={"id": "id", "prompt": "prompt", "answer": "answer"})
    assert [(p.id, p.prompt, p.answer) for p in problems] == [(r["id"], r["prompt"], r["answer"]) for r in good]
    assert dict(report.skipped) == {reason: len(at) for reason, at in expected.items()}
    for reason, at in expected.items():
        assert report.examples[reason] == [f"{path}:{n}" for n in at]
    with pytest.raises(BadRowError, match=rf"{path}:{expected['invalid_json'][0]}: invalid_json"):
        load_jsonl(path, fields={"id": "id"})
    with pytest.raises(BadRowError, match="too_many_bad_rows"):
        load_jsonl(path, on_bad_row="skip", max_bad_fraction=0.1, fields={"id": "id"})
    reliability("bad rows: invalid JSON, missing and null answer, empty prompt, a 5 MB row, invalid UTF-8, "
                "duplicate id; BOM and CRLF", "data:rows", "each counted per reason with file:line; the 40 good "
                "rows kept as they are; error at the first bad row by default; abort above max_bad_fraction", 0)


def test_a_prompt_longer_than_the_context_is_a_bad_row(tmp_path, base_overrides, reliability):
    rows = [{"prompt": f"{i}+{i}", "answer": str(2 * i)} for i in range(1, 30)]
    rows.insert(7, {"prompt": "+".join(["12"] * 400), "answer": "4800"})
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = base_overrides + ["data.source=jsonl", f"data.path={path}", "phases=[{kind: profile, limit: 4}]",
                             "profile.k=2"]
    refused = fit(args + [f"run.dir={tmp_path / 'a'}"])
    assert refused.returncode == 2 and f"{path}:8: prompt_too_long" in refused.stderr, refused.stderr[-2000:]
    out = fit(args + [f"run.dir={tmp_path / 'b'}", "data.on_bad_row=skip"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "29 problems, skipped 1: prompt_too_long 1" in out.stdout and f"{path}:8" in out.stdout
    reliability("a prompt longer than the model's context", "data:prompt_too_long",
                "error with file:line (exit 2); with data.on_bad_row=skip counted and left out", 0)


def test_a_nan_loss_on_one_ddp_rank_is_skipped_by_every_rank(tmp_path, base_overrides, reliability):
    run_dir = tmp_path / "ddp"
    sft = base_overrides + ["phases=[{name: s, kind: sft, steps: 4, lr: 5e-4}]", "trainer.batch_size=8",
                            f"run.dir={run_dir}", "trainer.strategy=ddp", "trainer.devices=2",
                            "trainer.accelerator=cpu", "run.threads=1"]
    out = fit(sft, {"STAGEWISE_FAULT": "nan_loss:s:2", "STAGEWISE_FAULT_RANK": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads((run_dir / "state.json").read_text())["completed"]["s"]["nonfinite_skipped"] == 1
    ranks = [json.loads((run_dir / "routing" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final weights"] == ranks[1]["final weights"]
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    reliability("NaN loss on one of two DDP ranks", "nan:nan_loss:s:2 (rank 1)", "every rank skips the step; "
                "the same finite weights on both ranks", 0)
