"""The Claim experiment (python -m stagewise_pl.experiment): arms at equal budgets, the Slurm fan-out, the
results table and plots; the --quick run is what CI runs, and it checks that every cell and plot is made."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagewise_pl.config import EXPERIMENTS_DIR, ConfigError, available_confs, load_config
from stagewise_pl.experiment import ExperimentError, allot, fit_args, load_experiment, main

EXPERIMENT = EXPERIMENTS_DIR / "experiment.yaml"
SKILLS = EXPERIMENTS_DIR / "experiment_skills.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "e.yaml"
    path.write_text(text)
    return path


def test_shares_become_steps_that_sum_to_the_budget_exactly():
    phases = [{"kind": "profile"}, {"kind": "bridge_sft", "share": 3}, {"kind": "profile"},
              {"kind": "grpo", "share": 2}, {"kind": "cft", "share": 1}]
    for total in (6, 7, 12, 119, 120, 121):
        steps = [p.get("steps") for p in allot(phases, total)]
        assert sum(s for s in steps if s) == total
        assert steps[0] is None and steps[2] is None  # profiles take no optimizer step
    assert [p["steps"] for p in allot(phases, 120) if "steps" in p] == [60, 40, 20]
    assert all("share" not in p for p in allot(phases, 12))
    with pytest.raises(ExperimentError, match="0 steps"):
        allot([{"kind": "sft", "share": 1}, {"kind": "grpo", "share": 100}], 12)


@pytest.mark.parametrize("text, message", [
    ("seeds: [0]\nbudget: {optimizer_steps: 10, generated_tokens: 100}\narms: {a: {phases: [{kind: sft}]}}",
     "needs a share"),
    ("seeds: [0]\nbudget: {optimizer_steps: 10, generated_tokens: 100}\n"
     "arms: {a: {phases: [{kind: sft, share: 1, steps: 4}]}}", "not steps"),
    ("seeds: []\nbudget: {optimizer_steps: 10, generated_tokens: 100}\narms: {a: {phases: [{kind: eval}]}}",
     "seeds must be"),
    ("seeds: [0]\nbudget: {optimizer_steps: 0, generated_tokens: 100}\narms: {a: {phases: [{kind: eval}]}}",
     "optimizer_steps"),
    ("seeds: [0]\nbudget: {optimizer_steps: 1, generated_tokens: 100}\nfoo: 1\narms: {a: {phases: [{kind: eval}]}}",
     "unknown keys"),
])
def test_a_bad_experiment_file_is_an_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ExperimentError, match=message):
        load_experiment(write(tmp_path, text))


def test_every_arm_is_a_valid_run_at_the_same_budget(tmp_path):
    """Both budgets of conf/experiments/experiment.yaml: every arm's command line loads; its training phases sum to the
    budget's optimizer steps and every GRPO phase runs under the same token budget; arms (a)-(f) are there."""
    from stagewise_pl.phases import kind_traits

    for quick in (False, True):
        exp = load_experiment(EXPERIMENT, quick)
        assert len(exp.seeds) >= (2 if quick else 3)
        names = {a.name for a in exp.arms}
        assert {"sft_reference", "distill", "rl", "sft_then_rl", "stagewise", "no_bridge", "no_cft", "one_round",
                "hpt", "relift"} <= names
        for arm in exp.arms:
            args = fit_args(exp, arm, exp.seeds[0], tmp_path)
            cfg = load_config(exp.base, args[1:])
            trained = [p.steps for p in cfg.phases if kind_traits([p.kind])[p.kind].trains]
            assert sum(trained) == exp.optimizer_steps, arm.name
            assert cfg.budget.generated_tokens == exp.generated_tokens
            assert cfg.run.dir == str(tmp_path / arm.name / f"seed-{exp.seeds[0]}")
            assert cfg.data.target == "reference"  # no arm trains on the task's one-step traces


def test_the_skill_experiment_runs_the_first_tasks_arms_on_the_skill_task(tmp_path):
    """conf/experiments/experiment_skills.yaml extends experiment.yaml beside it: the same arms, phases and shares
    (so the two tables compare arm for arm), on conf/skills.yaml's levels, at its own budget, with sequential
    profiles; both budgets load."""
    first = load_experiment(EXPERIMENT)
    for quick in (False, True):
        exp = load_experiment(SKILLS, quick)
        assert exp.base == "skills" and len(exp.seeds) >= (2 if quick else 3)
        assert [(a.name, a.overrides, a.phases) for a in exp.arms] == [(a.name, a.overrides, a.phases)
                                                                         for a in first.arms]
        assert exp.optimizer_steps == (12 if quick else 240)
        for arm in exp.arms:
            cfg = load_config(exp.base, fit_args(exp, arm, exp.seeds[0], tmp_path)[1:])
            assert cfg.task.skill_levels and cfg.profile.sequential and cfg.data.target == "reference"
            assert cfg.budget.generated_tokens == exp.generated_tokens


def test_the_real_model_comparison_runs_smollm2s_plan_against_rl_alone_both_graded_literally(tmp_path):
    """conf/experiments/experiment_smollm2_literal.yaml: the method arm is conf/smollm2.yaml's own plan (same phases,
    steps, selections, learning rates), RL alone spends the same optimizer steps and token cap, and both arms train and
    grade with literal answers (the earlier RL arm's reward accepted a restated expression)."""
    exp = load_experiment(EXPERIMENTS_DIR / "experiment_smollm2_literal.yaml", False)
    assert {a.name for a in exp.arms} == {"method", "rl"} and exp.base == "smollm2"
    plan = load_config("smollm2")
    for arm in exp.arms:
        cfg = load_config(exp.base, fit_args(exp, arm, exp.seeds[0], tmp_path)[1:])
        assert cfg.verifier.options["literal_answers"] is True, arm.name
        assert cfg.budget.generated_tokens == exp.generated_tokens == 40235
        if arm.name == "method":
            assert [(p.name, p.kind, p.select, p.steps, p.lr, p.replay, p.fallback) for p in cfg.phases] == \
                [(p.name, p.kind, p.select, p.steps, p.lr, p.replay, p.fallback) for p in plan.phases]
        else:
            assert [(p.kind, p.select, p.steps) for p in cfg.phases] == [("grpo", "all", exp.optimizer_steps)]


def test_extends_adds_overrides_after_the_parents_and_replaces_or_drops_arms_by_name(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "seeds: [0, 1]\nbudget: {optimizer_steps: 10, generated_tokens: 100}\noverrides: [a=1]\n"
        "arms: {x: {phases: [{kind: eval}]}, y: {phases: [{kind: sft, share: 1}]}}\n"
        "quick: {seeds: [0], overrides: [q=1]}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nbase: skills\nbudget: {optimizer_steps: 20, generated_tokens: 100}\n"
                     "overrides: [a=2]\narms: {y: {title: new, phases: [{kind: grpo, share: 1}]}, z: {phases: "
                     "[{kind: eval}]}}\nquick: {overrides: [q=2]}\n")
    exp = load_experiment(child)
    assert (exp.base, exp.seeds, exp.optimizer_steps, exp.overrides) == ("skills", [0, 1], 20, ["a=1", "a=2"])
    assert [(a.name, a.title, a.phases[0]["kind"]) for a in exp.arms] == [("x", "x", "eval"), ("y", "new", "grpo"),
                                                                          ("z", "z", "eval")]
    quick = load_experiment(child, quick=True)
    assert quick.seeds == [0] and quick.overrides == ["a=1", "a=2", "q=1", "q=2"]
    child.write_text("extends: parent.yaml\narms: {x: null, z: {phases: [{kind: eval}]}}\n")
    assert [a.name for a in load_experiment(child).arms] == ["y", "z"]  # x left out, y inherited
    child.write_text("extends: parent.yaml\narms: {w: null}\n")
    with pytest.raises(ExperimentError, match="arms.w: null leaves out an arm of parent.yaml, which has none of that "
                                              "name; its arms: x, y"):
        load_experiment(child)
    for target in ("child.yaml", "nope.yaml"):
        child.write_text(f"extends: {target}\n")
        with pytest.raises(ExperimentError, match="not another experiment file"):
            load_experiment(child)
    (tmp_path / "parent.yaml").write_text("extends: child.yaml\n")
    child.write_text("extends: parent.yaml\n")
    with pytest.raises(ExperimentError, match="without an extends"):
        load_experiment(child)


def test_a_fallback_bucket_is_checked_like_select():
    from stagewise_pl.preflight import plan_phases

    def plan(phases: str):
        return plan_phases(load_config("default", [f"phases={phases}"]))

    with pytest.raises(ConfigError, match="phases.2.fallback='nope'"):
        plan("[{kind: profile}, {kind: grpo, select: medium, steps: 2}, "
             "{kind: cft, select: unsolved_in_rl, fallback: nope, steps: 2}]")
    with pytest.raises(ConfigError, match="never has an empty selection"):
        plan("[{kind: profile}, {kind: sft, select: all, fallback: hard, steps: 2}]")
    specs = plan("[{kind: profile}, {kind: grpo, select: medium, steps: 2}, "
                 "{kind: cft, select: unsolved_in_rl, fallback: hard, steps: 2}]")
    assert specs[2].fallback == "hard"


def test_the_experiment_file_is_not_a_fit_conf():
    assert "experiment" not in available_confs()
    with pytest.raises(ConfigError, match="stagewise_pl.experiment"):
        load_config("experiment")


def test_a_rerun_resumes_what_was_stopped_and_skips_what_finished(tmp_path):
    from stagewise_pl.experiment import finished, resume_args

    run = tmp_path / "run"
    assert resume_args(run) == [] and not finished(run)  # never started: a fresh run
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"completed": {}}))
    assert resume_args(run) == ["resume=restart"]  # stopped before its first checkpoint
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "previous.ckpt").write_bytes(b"x")
    assert resume_args(run) == ["resume=last"]  # the fit verifies the checkpoint and falls back if asked
    (run / "state.json").write_text(json.dumps({"completed": {
        "p": {"kind": "profile", "generated_tokens": 300, "seconds": 10.0},
        "g": {"kind": "grpo", "generated_tokens": 700, "seconds": 30.0, "optimizer_steps": 2}}, "finished": True}))
    assert finished(run)


def test_a_runs_teacher_texts_are_the_sum_over_its_phases(tmp_path):
    """The table's teacher texts (a real teacher's cost): every phase's ``teacher_texts`` summed; a phase without
    one (profile, grpo) counts nothing."""
    from stagewise_pl.experiment.results import read_run

    run = tmp_path / "run"
    run.mkdir()
    phases = {"p": {"kind": "profile", "generated_tokens": 10}, "b": {"kind": "bridge_sft", "teacher_texts": 7},
              "g": {"kind": "grpo"}, "h": {"kind": "hpt", "teacher_texts": 5, "optimizer_steps": 2}}
    (run / "state.json").write_text(json.dumps({"completed": phases, "finished": True}))
    got = read_run(run)
    assert got["teacher_texts"] == 12 and got["optimizer_steps"] == 2 and got["generated_tokens"] == 10
    assert got["skill_levels"] == []  # no config.yaml: the plain task


def test_on_the_skill_task_the_table_splits_skill_levels_from_the_rest(tmp_path):
    """A run of conf/skills.yaml: its skill levels (numbered after task.levels) read from its config.yaml; the table
    gains held-out pass@1 on them and on the other levels, each level weighted by its problems."""
    from omegaconf import OmegaConf

    from stagewise_pl.experiment.results import group_pass, read_run, skill_levels, table

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(load_config("skills"))))
    assert skill_levels(run) == ["7", "8", "9"]
    by_level = {"1": {"n": 10, "pass@1": 1.0}, "6": {"n": 30, "pass@1": 0.0}, "7": {"n": 50, "pass@1": 0.5},
                "9": {"n": 150, "pass@1": 0.1}, "all": {"n": 240, "pass@1": 0.2}}
    assert group_pass(by_level, ["7", "8", "9"]) == pytest.approx((25 + 15) / 200)
    assert group_pass(by_level, ["1", "6"]) == pytest.approx(10 / 40) and group_pass(by_level, ["8"]) is None
    (run / "state.json").write_text(json.dumps({"completed": {
        "p": {"kind": "profile", "generated_tokens": 300, "seconds": 10.0},
        "g": {"kind": "grpo", "generated_tokens": 700, "seconds": 30.0, "optimizer_steps": 2}}, "finished": True}))
    (run / "eval").mkdir()
    (run / "eval" / "before.json").write_text(json.dumps({"synthetic-test": {"by_level": by_level}}))
    got = read_run(run)
    assert got["skill_levels"] == ["7", "8", "9"]
    assert got["skill"] == pytest.approx(40 / 200) and got["rest"] == pytest.approx(10 / 40)
    assert got["profile_tokens"] == pytest.approx(0.3) and got["profile_time"] == pytest.approx(0.25)
    arm = {"title": "x", "seeds_done": [0], "pass@1": [0.2], "skill": [0.2], "rest": [0.25], "levels": {},
           "generated_tokens": [1], "optimizer_steps": [1], "teacher_texts": [3], "wall_s": [1.0],
           "profile_tokens": [got["profile_tokens"]], "profile_time": [got["profile_time"]]}
    header, rows = table({"arms": {"x": arm}})
    assert rows[0][header.index("profiles' share of tokens")] == "0.30"
    assert header[2:5] == ["pass@1 (all)", "pass@1 (skill levels)", "pass@1 (other levels)"]
    assert rows[0][3:5] == ["0.200", "0.250"] and rows[0][header.index("teacher texts")] == "3"
    header, _ = table({"arms": {"x": dict(arm, skill=[], rest=[])}})
    assert "pass@1 (skill levels)" not in header  # the plain task: no split


def test_dry_run_prints_one_fit_per_arm_and_seed(tmp_path, capsys):
    assert main(["--dry-run", f"run.dir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    exp = load_experiment(EXPERIMENT)
    assert len(lines) == len(exp.arms) * len(exp.seeds)
    assert all(line.startswith("python -m stagewise_pl.fit conf=default") for line in lines)
    assert main(["--arms", "nope", f"run.dir={tmp_path}"]) == 2
    assert main(["--dry-run", "seed=3"]) == 2


def test_slurm_submits_one_array_task_per_arm_and_seed_then_the_report(tmp_path):
    """A stand-in sbatch records its calls: the array script has one case per arm x seed, each its own run
    directory; the report job waits for the array (afterany)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {bin_dir}/calls\n'
                                    f'if [ -f {bin_dir}/n ]; then echo 43; else touch {bin_dir}/n; echo 42; fi\n')
    (bin_dir / "sbatch").chmod(0o755)
    root = tmp_path / "exp"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.experiment", "--slurm", "--quick", f"run.dir={root}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    exp = load_experiment(EXPERIMENT, quick=True)
    n = len(exp.arms) * len(exp.seeds)
    script = (root / "submit.sbatch").read_text()
    assert f"#SBATCH --array=0-{n - 1}" in script
    for seed in exp.seeds:
        for arm in exp.arms:
            assert f"RUN_DIR={root / arm.name / f'seed-{seed}'};" in script
    calls = (bin_dir / "calls").read_text().splitlines()
    assert len(calls) == 2 and calls[1].startswith("--parsable --dependency=afterany:42")
    assert "--report" in calls[1] and "--quick" in calls[1]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["job_id"] == "42" and manifest["report_job"] == "43" and len(manifest["tasks"]) == n


def test_grpo_spends_the_runs_token_budget(tmp_path, base_overrides):
    """A profile then GRPO under budget.generated_tokens (the real tiny base model: its groups carry signal): the run's
    generated tokens (profile + rollouts) end within 10% of the budget, GRPO taking what the profile left."""
    from stagewise_pl.fit import main as fit

    budget = 15000
    run = tmp_path / "run"
    assert fit(["conf=default", *base_overrides, "eval.each_phase=false", "profile.k=4", "trainer.batch_size=8",
                "profile.limit=24", "grpo.num_generations=4",
                "phases=[{name: p, kind: profile}, {name: g, kind: grpo, select: all, steps: 6}]",
                f"budget.generated_tokens={budget}", f"run.dir={run}"]) == 0
    done = json.loads((run / "state.json").read_text())["completed"]
    profile, grpo = done["p"]["generated_tokens"], done["g"]["generated_tokens"]
    assert 0 < profile < budget and grpo > 0
    assert abs(profile + grpo - budget) <= 0.1 * budget, (profile, grpo)
    assert done["g"]["mean_prompts"] > 1


@pytest.mark.slow  # every arm once, one arm twice: about 3 minutes
def test_quick_experiment_makes_every_cell_and_plot(tmp_path):
    """python -m stagewise_pl.experiment --quick (two runs at a time), in three calls as a user resuming would: every
    arm on seed 0; one arm on both seeds (seed 0 found finished); then --report over every arm. Every cell of the
    table is filled, the arm with two seeds has a std, the missing runs are named, every plot is a PNG; the
    numbers themselves are not asserted."""
    from matplotlib.image import imread

    root = tmp_path / "quick"

    def run(*args, timeout=2700):  # a net for hangs: 5 min idle, far more on a loaded machine
        return subprocess.run([sys.executable, "-m", "stagewise_pl.experiment", "--quick", *args, f"run.dir={root}"],
                              capture_output=True, text=True, timeout=timeout)

    out = run("--jobs", "2", "--seeds", "0")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exp = load_experiment(EXPERIMENT, quick=True)
    twice = ["rl"]
    out = run("--jobs", "2", "--arms", ",".join(twice))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("finished earlier") == len(twice)  # seed 0 of each: not run again
    out = run("--report", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((root / "results.json").read_text())
    assert list(data["arms"]) == [a.name for a in exp.arms] and exp.seeds == [0, 1]
    for name, arm in data["arms"].items():
        assert arm["seeds_done"] == ([0, 1] if name in twice else [0]), name
        assert len(arm["trajectory"]) >= 2, name
    text = (root / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table) == len(exp.arms)
    titles = {a.name: a.title for a in exp.arms}
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # arm, seeds, all, L1-L6, tokens, steps, texts, wall time, the profiles' shares of tokens and time
        assert len(cells) == 15 and all(c and c != "-" for c in cells), row
        assert all(("±" in c) == (cells[0] in {titles[n] for n in twice}) for c in cells[2:]), row
    missing = next(line for line in text.splitlines() if line.startswith("**Runs missing"))
    assert all((titles[n] in missing) == (n not in twice) for n in titles), missing
    assert sorted(data["plots"]) == ["accuracy.png", "buckets.png", "flow.png", "rewards.png"]
    for name in data["plots"]:
        assert imread(root / name).shape[0] > 100


@pytest.mark.parametrize("target", ["own", pytest.param("own_easy", marks=pytest.mark.slow)])
def test_own_replay_trains_on_the_students_correct_profile_solutions(tmp_path, base_overrides, target):
    """data.replay_target=own: the replayed problems are ones the latest profile saw solved, each with one of the
    student's own completions there that the verifier graded correct; the routing records them. own_easy
    (self-replay): only problems that profile found easy."""
    from stagewise_pl.fit import main as fit
    from stagewise_pl.ledger import DifficultyLedger

    run = tmp_path / "run"
    assert fit(["conf=default", *base_overrides, "eval.each_phase=false", "profile.k=4", "trainer.batch_size=8",
                f"data.replay_target={target}", "profile.limit=24",
                "phases=[{name: p, kind: profile}, {name: s, kind: sft, select: hard, replay: 0.5, steps: 2}]",
                f"run.dir={run}"]) == 0
    routing = json.loads((run / "routing" / "02-s.json").read_text())
    own = routing["replay_targets"]
    assert own and sorted(own) == sorted(routing["replay"])
    rows = DifficultyLedger(run / "ledger", "x", writer=False).table().to_pylist()
    correct = {(r["problem_id"], r["completion"]) for r in rows if r["phase"] == "p" and r["reason"] == "correct"}
    assert all((pid, text) in correct for pid, text in own.items())
    assert not set(own) & set(routing["ids"]["hard"])  # replay comes from outside the taught bucket
    easy = set(routing["ids"]["easy"])
    if target == "own_easy":
        assert set(own) <= easy
    else:  # own draws from every problem the profile saw solved: medium ones too, in this run
        assert set(own) - easy


SKILL_ARMS = ["stagewise", "distill", "rl", "relift"]  # the method, a teacher-only, an RL-only and a peer arm


@pytest.mark.slow  # four arms once on seed 0: about a minute (every arm's cells: the first task's quick test)
def test_quick_skill_experiment_fills_the_skill_and_other_level_columns(tmp_path):
    """python -m stagewise_pl.experiment --conf conf/experiments/experiment_skills.yaml --quick on seed 0, four kinds
    of arm: the table has levels L1-L9 and the skill/other split, every cell filled, every plot made; the numbers are
    not asserted."""
    root = tmp_path / "skills"
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.experiment", "--conf", str(SKILLS), "--quick", "--jobs",
                          "2", "--seeds", "0", "--arms", ",".join(SKILL_ARMS), f"run.dir={root}"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = (root / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| arm |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[2:5] == ["pass@1 (all)", "pass@1 (skill levels)", "pass@1 (other levels)"]
    assert [c for c in columns if c.startswith("L")] == [f"L{i}" for i in range(1, 10)]
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == len(SKILL_ARMS)
    assert {a.name for a in load_experiment(SKILLS, quick=True).arms} >= set(SKILL_ARMS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(columns) and all(c and c != "-" for c in cells), row
    data = json.loads((root / "results.json").read_text())
    assert all(len(arm["skill"]) == len(arm["rest"]) == 1 for arm in data["arms"].values())
    # tools/claim_breakdown.py reads the same directories: trajectories by level, what the routed phases trained on
    out = subprocess.run([sys.executable, "tools/claim_breakdown.py", str(root), "--skill-levels", "7,8,9"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "| after | L1 |" in out.stdout and "| skill | rest |" in out.stdout
    assert "### stagewise" in out.stdout and "| r1-bridge trained |" in out.stdout and "- distill: " in out.stdout
    assert sorted(data["plots"]) == ["accuracy.png", "buckets.png", "flow.png", "rewards.png"]
