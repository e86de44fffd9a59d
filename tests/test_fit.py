"""The real entry point, a few steps on the tiny model: files written, resume, refusals."""
import json
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from stagewise_pl.config import ConfigError, load_config
from stagewise_pl.fit import main
from stagewise_pl.run import Run

from helpers import CrashAt


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_fit_writes_the_run_directory(tmp_path, fast_overrides, cache_dir, capsys):
    run_dir = tmp_path / "run"
    assert main(fast_overrides + [f"run.dir={run_dir}"]) == 0
    out = capsys.readouterr().out  # the console: short phase lines and a narrow table; the figures in the files
    assert "phase 1-sft done: 6 optimizer steps" in out and '"kind"' not in out
    closing = out[out.index("held-out greedy pass@1 by level"):].splitlines()
    assert closing[1].split()[0] == "after" and closing[-1].startswith("run directory:")
    assert all(len(line) <= 100 for line in closing[:-1]), closing
    for path in ["config.yaml", "state.json", "summary.md", "eval/before.json", "eval/1-sft.json",
                 "checkpoints/last.ckpt", "routing/01-1-sft.json", "export/1-sft/model.safetensors",
                 "export/1-sft/tokenizer.json", "final/model.safetensors",
                 "final/config.json", "logs/metrics.csv"]:
        assert (run_dir / path).is_file(), path
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"]["1-sft"]["steps"] == 6
    sft = state["completed"]["1-sft"]  # data.target=teacher_trace: each problem's trace, written by a teacher
    assert sft["target"] == "teacher_trace" and sft["teacher_texts"] == sft["problems"] > 0
    assert "phases:" in (run_dir / "config.yaml").read_text()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "1-sft/train/loss" in metrics and "eval/before/synthetic-test/all/pass@1" in metrics
    summary = (run_dir / "summary.md").read_text()
    assert "before pass@1" in summary and "1-sft pass@1" in summary and "| all |" in summary
    # final/ is the policy after the last phase, and training moved it away from the cached base model
    final = weights(run_dir / "final")
    assert all(torch.equal(final[k], v) for k, v in weights(run_dir / "export" / "1-sft").items())
    from stagewise_pl.models.base import base_key

    # the session's cache may hold other bases (tests with other warm-up settings): this run's is named by its key
    base = weights(cache_dir / f"tiny-base-{base_key(load_config('default', fast_overrides))}")
    assert any(not torch.equal(final[k], base[k]) for k in base)


class StepRecorder(L.Callback):
    """Records the global step at the start of every training batch."""

    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, *args):
        self.steps.append(trainer.global_step)


def test_resume_continues_at_the_same_step_and_matches(tmp_path, fast_overrides):
    overrides = fast_overrides + ["eval.before=false", "eval.k=0"]
    straight = tmp_path / "straight"
    assert main(overrides + [f"run.dir={straight}"]) == 0

    crashed = tmp_path / "crashed"
    run = Run(load_config("default", overrides + [f"run.dir={crashed}"]), log=lambda *_: None)
    run.callbacks.append(CrashAt(4))
    with pytest.raises(RuntimeError, match="injected crash"):
        run.execute()
    state = json.loads((crashed / "state.json").read_text())
    assert state["completed"] == {} and not state.get("finished")
    assert torch.load(crashed / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3

    resumed = Run(load_config("default", overrides + [f"run.dir={crashed}", "run.resume=last"]), log=lambda *_: None)
    assert resumed.choose_checkpoint() == str(crashed / "checkpoints" / "last.ckpt")
    record = StepRecorder()
    resumed.callbacks.append(record)
    resumed.execute()
    assert record.steps == [3, 4, 5]  # continued at the checkpointed step, not from zero
    final, reference = weights(crashed / "final"), weights(straight / "final")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_resume_with_another_thread_count_says_the_weights_will_differ(tmp_path, fast_overrides):
    """Float sums depend on the torch thread count: the run records the count it started with, and a resume with
    another says that its weights will not be the uninterrupted run's bit for bit (and how to match)."""
    overrides = fast_overrides + ["eval.before=false", "eval.k=0", f"run.dir={tmp_path / 'r'}"]
    run = Run(load_config("default", overrides), log=lambda *_: None)
    run.callbacks.append(CrashAt(4))
    with pytest.raises(RuntimeError, match="injected crash"):
        run.execute()
    threads = torch.get_num_threads()
    assert json.loads((tmp_path / "r" / "state.json").read_text())["threads"] == threads
    said = []
    try:
        Run(load_config("default", overrides + ["run.resume=last", f"run.threads={threads + 1}"]),
            log=said.append).execute()
    finally:
        torch.set_num_threads(threads)
    assert any(f"with {threads + 1} torch threads, the run started with {threads}" in line
               and f"run.threads={threads}" in line for line in said), said
    assert json.loads((tmp_path / "r" / "state.json").read_text())["threads"] == threads  # the first launch's


@pytest.mark.parametrize("keep", ["all", "final"])
def test_resume_of_a_finished_run_is_a_no_op(tmp_path, fast_overrides, capsys, keep):
    """run.keep=final: no per-phase export, and no checkpoint once the run has finished; a resume still says
    there is nothing to do."""
    run_dir = tmp_path / "done"
    assert main(fast_overrides + [f"run.dir={run_dir}", "eval.k=0", f"run.keep={keep}"]) == 0
    assert (run_dir / "export" / "1-sft").is_dir() == (keep == "all")
    assert (run_dir / "checkpoints").is_dir() == (keep == "all")
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "summary.md").is_file()
    before = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(fast_overrides + [f"run.dir={run_dir}", "eval.k=0", "resume=last"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_refusals(tmp_path, fast_overrides):
    run_dir = tmp_path / "r"
    assert main(fast_overrides + [f"run.dir={run_dir}", "eval.k=0"]) == 0
    with pytest.raises(ConfigError, match="already holds a run"):
        Run(load_config("default", fast_overrides + [f"run.dir={run_dir}", "eval.k=0"]))
    with pytest.raises(ConfigError, match="differs.*optim.lr"):
        Run(load_config("default", fast_overrides + [f"run.dir={run_dir}", "eval.k=0", "optim.lr=0.5",
                                                    "phases.0.steps=9", "run.resume=last"])).execute()
    with pytest.raises(ConfigError, match="no config.yaml"):
        Run(load_config("default", [f"run.dir={tmp_path / 'empty'}", "run.resume=last"]))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        Run(load_config("default", [f"run.resume={tmp_path / 'missing.ckpt'}"]))


def test_unknown_phase_kind_fails_before_work(tmp_path, fast_overrides):
    """The phase-kind registry is the source of the allowed kinds: the configuration names the registered ones."""
    from stagewise_pl.phases import PHASES

    builtin = {"bridge_sft", "cft", "eval", "grpo", "hinted", "hpt", "luffy", "profile", "relift", "sft"}
    registered = sorted(PHASES.names())  # the built-ins, and any kind a plug-in imported earlier registered
    assert builtin <= set(registered)
    with pytest.raises(ConfigError, match="'phases.0.kind': 'nonexistent' is not registered; registered: "
                                          + ", ".join(registered) + r" \(or a dotted path"):
        load_config("default", fast_overrides + [f"run.dir={tmp_path / 'x'}", "phases.0.kind=nonexistent"])
    cfg = load_config("default", fast_overrides + [f"run.dir={tmp_path / 'x'}", "phases.0.kind=no_such.module:Kind"])
    with pytest.raises(ConfigError, match="phases.0.kind: unknown phase kind 'no_such.module:Kind'"):
        Run(cfg).execute()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("logger,pattern", [("tensorboard", "events.out.tfevents*"), ("wandb", "wandb/offline-run-*")])
def test_other_loggers_write_offline(tmp_path, fast_overrides, logger, pattern, monkeypatch):
    pytest.importorskip(logger)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / logger
    assert main(fast_overrides + [f"run.dir={run_dir}", f"run.logger={logger}", "eval.k=0",
                                  "phases.0.steps=2"]) == 0
    assert list(run_dir.rglob(pattern.split("/")[-1])), f"no {pattern} under {run_dir}"


def test_entry_point_as_a_module(tmp_path, fast_overrides):
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", *fast_overrides, f"run.dir={tmp_path / 'm'}",
                          "eval.k=0", "phases.0.steps=2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "greedy pass@1" in out.stdout and (tmp_path / "m" / "final" / "model.safetensors").is_file()


def test_resume_from_a_given_checkpoint(tmp_path, fast_overrides):
    overrides = fast_overrides + ["eval.before=false", "eval.k=0", f"run.dir={tmp_path / 'c'}"]
    run = Run(load_config("default", overrides), log=lambda *_: None)
    run.callbacks.append(CrashAt(5))
    with pytest.raises(RuntimeError):
        run.execute()
    step3 = tmp_path / "c" / "checkpoints" / "kept-3.ckpt"
    shutil.copy(tmp_path / "c" / "checkpoints" / "last.ckpt", step3)
    resumed = Run(load_config("default", overrides + [f"run.resume={step3}"]), log=lambda *_: None)
    assert resumed.dir == tmp_path / "c" and resumed.choose_checkpoint() == str(step3)
    record = StepRecorder()
    resumed.callbacks.append(record)
    resumed.execute()
    assert record.steps == [3, 4, 5]


def test_accumulation_packing_and_benchmark_eval(tmp_path, fast_overrides):
    from conftest import benchmarks_dir

    gsm8k = benchmarks_dir() / "gsm8k_test.jsonl"
    run_dir = tmp_path / "acc"
    assert main(fast_overrides + [f"run.dir={run_dir}", "trainer.accumulate_grad_batches=2", "trainer.packing=false",
                                  "phases.0.steps=4", "eval.k=0", f"eval.benchmarks=[{gsm8k}]", "eval.limit=3",
                                  "eval.max_new_tokens=8"]) == 0
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"]["1-sft"]["steps"] == 4  # optimizer steps, each of 2 micro-batches
    results = json.loads((run_dir / "eval" / "1-sft.json").read_text())
    assert set(results) == {"synthetic-test", "gsm8k_test"} and results["gsm8k_test"]["by_level"]["all"]["n"] == 3


def test_a_phase_summary_prints_as_one_short_line():
    """Each kind answers its own line (PhaseRunner.brief around the kind's brief_parts): the manager knows no
    kind's summary keys."""
    from stagewise_pl.phases import BridgeSFTRunner, CFTRunner, EvalRunner, GRPORunner, ProfileRunner, ReLIFTRunner

    def brief(summary):
        cls = {"grpo": GRPORunner, "profile": ProfileRunner, "bridge_sft": BridgeSFTRunner, "cft": CFTRunner,
               "eval": EvalRunner, "relift": ReLIFTRunner}[summary["kind"]]
        return cls.brief(cls.__new__(cls), summary)  # a line needs no runner state

    grpo = {"kind": "grpo", "steps": 2, "rollout_steps": 2, "optimizer_steps": 2, "rollouts": 588,
            "generated_tokens": 13642, "mean_prompts": 73.5, "problems": 19, "reward_first_tenth": 0.5341,
            "reward_last_tenth": 0.6944, "zero_groups": 0.2138, "seconds": 2.1, "select": "medium",
            "buckets": {"hard": 21, "medium": 19, "easy": 0}}
    assert brief(grpo) == ("2 optimizer steps, 19 problems (medium), reward 0.53 -> 0.69, 13 642 tokens generated, "
                           "2 s")
    profile = {"kind": "profile", "problems": 40, "k": 8, "easy": 11, "medium": 11, "hard": 18,
               "mean_pass_rate": 0.4146, "generated_tokens": 6997, "seconds": 1.4, "select": "all"}
    assert brief(profile) == "40 problems, easy/medium/hard 11/11/18, mean p 0.415, 6 997 tokens generated, 1 s"
    bridge = {"kind": "bridge_sft", "optimizer_steps": 3, "problems": 18, "examples": 24, "final_loss": 0.4514,
              "teacher_texts": 18, "strategy": "student_rewrite", "kept": 6, "acceptance": 0.3333, "select": "hard"}
    assert brief(bridge) == ("3 optimizer steps, 18 problems (hard), 24 examples, loss 0.451, bridged 6 "
                             "(acceptance 0.33), 18 teacher texts")
    skipped = brief({"kind": "cft", "problems": 0, "skipped": "bucket 'x' is empty"})
    assert skipped.endswith("skipped: bucket 'x' is empty")
    assert brief({"kind": "eval"}) == "eval"
    relift = dict(grpo, kind="relift", sft_steps=1, rl_updates=3)
    assert brief(relift).startswith("2 optimizer steps, 19 problems (medium), 1 SFT + 3 RL, reward 0.53 -> 0.69")


def test_off_a_terminal_the_log_has_whole_lines_and_no_carriage_returns(tmp_path, fast_overrides):
    """Run into a file (a Slurm log): progress as whole lines, never a bar's carriage returns, and every message on
    its own line (a bar's last state once ran into the phase line after it)."""
    from helpers import fit

    plan = "phases=[{kind: profile, limit: 24}, {kind: grpo, select: medium, steps: 2, lr: 1e-4}]"
    out = fit(fast_overrides + [f"run.dir={tmp_path / 'r'}", "run.progress_bar=true", plan, "grpo.num_generations=4",
                                "grpo.prompts_per_step=4", "profile.k=4"])
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "\r" not in log and "it/s]" not in log
    assert any(line.startswith("phase 1-profile done: ") for line in out.stdout.splitlines())
    assert any(line.startswith("phase 2-grpo done: ") for line in out.stdout.splitlines())


def test_line_progress_writes_quarters_once_the_work_is_long():
    from stagewise_pl.progress import LineProgress

    lines = []
    bar = LineProgress(8, "grading", min_seconds=0.0, write=lines.append)
    for _ in range(8):
        bar.update(1)
    bar.close()
    assert [line.split(", ")[0] for line in lines] == ["grading: 25% (2/8)", "grading: 50% (4/8)",
                                                       "grading: 75% (6/8)", "grading: 100% (8/8)"]
    quiet = []
    bar = LineProgress(8, "rollouts", min_seconds=3600.0, write=quiet.append)  # short work: nothing
    bar.update(8)
    bar.close()
    assert quiet == []
