import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stagewise_pl.cli import help_text
from stagewise_pl.config import CONF_DIR, Config, ConfigError, available_confs, load_config


def test_defaults_load():
    cfg = load_config("default")
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path == "tiny" and cfg.conf_name == "default"


@pytest.mark.parametrize("name", available_confs())
def test_every_conf_file_validates(name):
    cfg = load_config(name)
    assert cfg.phases, f"conf/{name}.yaml has an empty plan"


def test_unknown_key_in_override_names_key_and_source():
    with pytest.raises(ConfigError, match=r"command line.*'optim\.lrr'"):
        load_config("default", ["optim.lrr=3"])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value) and "learning_rate" in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'trainer\.batch_size'.*could not be converted"):
        load_config("default", ["trainer.batch_size=many"])


def test_wrong_type_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  packing: sometimes\n")
    with pytest.raises(ConfigError, match="trainer.packing"):
        load_config(str(bad))


def test_missing_file_lists_available():
    with pytest.raises(ConfigError, match="no such file.*available: .*default"):
        load_config("does-not-exist")


@pytest.mark.parametrize("override,key", [
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("run.logger=papyrus", "run.logger"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("data.source=jsonl", "data.path"),
    ("phases.0.steps=-1", "phases.0.steps"),
    ("model.warmup.level_weights=[1,1]", "model.warmup.level_weights"),
    ("trainer.strategy=fsdp", "trainer.strategy"),
    ("trainer.strategy=deepspeed_stage_2", "trainer.strategy"),
    ("trainer.precision=16-mixed", "trainer.precision"),
])
def test_bad_values_name_key_and_source(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert f"'{key}'" in str(err.value)
    assert "command line" in str(err.value) or "default.yaml" in str(err.value)


def test_bad_value_from_file_names_file(tmp_path):
    bad = tmp_path / "neg.yaml"
    bad.write_text("optim:\n  lr: -1.0\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*'optim.lr'"):
        load_config(str(bad))


def test_list_items_by_index_and_lists():
    cfg = load_config("default", ["phases.0.steps=7", "optim.betas=[0.8,0.9]"])
    assert cfg.phases[0].steps == 7 and cfg.optim.betas == [0.8, 0.9]


def test_help_lists_confs_and_every_group():
    text = help_text()
    for group in ("[run]", "[model]", "[task]", "[data]", "[optim]", "[trainer]", "[eval]", "[phases]"):
        assert group in text
    assert "optim.lr =" in text and "default" in text


def test_cli_help_and_error_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "conf=NAME" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", "optim.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.nope" in bad.stderr


def test_dry_run_prints_plan():
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", "--dry-run", "phases.1.steps=9"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "r1-bridge: bridge_sft on hard, 9 steps" in out.stdout


def test_conf_dir_is_the_projects():
    assert (CONF_DIR / "default.yaml").is_file()
    assert Path(CONF_DIR).parent.joinpath("stagewise_pl").is_dir()


@pytest.mark.parametrize("name", ["experiment", "experiment_skills", "experiment_skills_posthoc", "experiment_smollm2",
                                  "experiment_smollm2_literal", "experiment_smollm2_literal_cap",
                                  "experiment_smollm2_literal_sft", "experiment_smollm2_literal_tokens"])
def test_an_experiment_file_is_not_a_run_conf(name):
    assert name not in available_confs()
    with pytest.raises(ConfigError, match="describes an experiment"):
        load_config(name)


def test_a_run_conf_extends_another(tmp_path):
    """``extends: NAME``: the named conf (beside the file, else as conf=NAME) is merged first, key by key; a list
    such as the plan is replaced whole; chains work; the conf's name is the extending file's."""
    (tmp_path / "base.yaml").write_text("extends: default\noptim:\n  lr: 1.0e-4\n  grad_clip: 0.5\n"
                                        "phases:\n  - {name: p, kind: profile}\n  - {name: s, kind: sft, steps: 3}\n")
    (tmp_path / "child.yaml").write_text("extends: base\noptim:\n  lr: 2.0e-4\nphases:\n  - {name: e, kind: eval}\n")
    default, base, child = load_config("default"), load_config(str(tmp_path / "base.yaml")), load_config(
        str(tmp_path / "child.yaml"))
    assert base.model == default.model and base.task == default.task  # conf/default.yaml, found as conf=default
    assert (base.optim.lr, base.optim.grad_clip) == (1.0e-4, 0.5) and [p.name for p in base.phases] == ["p", "s"]
    assert (child.optim.lr, child.optim.grad_clip) == (2.0e-4, 0.5)  # one key overridden, the other inherited
    assert [p.name for p in child.phases] == ["e"] and child.conf_name == "child"
    assert load_config(str(tmp_path / "child.yaml"), ["optim.lr=3e-4"]).optim.lr == 3e-4  # the command line last


@pytest.mark.parametrize("text, message", [
    ("extends: nowhere\n", "extends: conf=nowhere: no such file"),
    ("extends: [default]\n", "must name another run conf"),
    ("extends: loop\n", "extends itself through loop.yaml -> loop.yaml"),
    ("extends: experiment_smollm2\n", "describes an experiment"),
])
def test_a_bad_extends_names_the_file(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'loop.yaml'}: ") + ".*" + re.escape(message)):
        load_config(str(tmp_path / "loop.yaml"))


def test_the_documented_longer_runs_extend_smollm2():
    """conf/smollm2_two_rounds.yaml and conf/smollm2_long.yaml hold only what differs from conf/smollm2.yaml."""
    for name in ("smollm2_two_rounds", "smollm2_long"):
        keys = list(OmegaConf.load(CONF_DIR / f"{name}.yaml").keys())
        assert keys == (["extends", "phases"] if name == "smollm2_two_rounds" else ["extends", "profile", "phases"])


def test_the_budget_group_and_its_former_keys(tmp_path):
    """budget.* is the run's budget; grpo.token_budget and grpo.max_prompts_per_step still load, on the command line
    and in a conf file, at their new place, with a deprecation message."""
    with pytest.warns(FutureWarning, match="grpo.token_budget is now budget.generated_tokens"):
        cfg = load_config("default", ["grpo.token_budget=5000"])
    assert cfg.budget.generated_tokens == 5000 and not hasattr(cfg.grpo, "token_budget")
    (tmp_path / "old.yaml").write_text("extends: default\ngrpo:\n  token_budget: 700\n  max_prompts_per_step: 9\n"
                                       "  prompts_per_step: 4\n")
    with pytest.warns(FutureWarning, match="grpo.token_budget -> budget.generated_tokens"):
        cfg = load_config(str(tmp_path / "old.yaml"))
    assert (cfg.budget.generated_tokens, cfg.budget.max_prompts_per_step, cfg.grpo.prompts_per_step) == (700, 9, 4)
    with pytest.raises(ConfigError, match="budget.max_prompts_per_step"):
        load_config("default", ["budget.max_prompts_per_step=0"])


def test_a_step_budget_is_checked_against_the_plan():
    from stagewise_pl.preflight import plan_phases

    plan = "phases=[{kind: profile}, {kind: sft, steps: 30}, {kind: grpo, select: medium, steps: 20}]"
    assert len(plan_phases(load_config("default", [plan, "budget.optimizer_steps=50"]))) == 3
    with pytest.raises(ConfigError, match=r"budget.optimizer_steps=49: the plan's training phases take 50 steps"):
        plan_phases(load_config("default", [plan, "budget.optimizer_steps=49"]))
    epochs = "phases=[{kind: sft, epochs: 2}]"
    with pytest.raises(ConfigError, match="train for epochs"):
        plan_phases(load_config("default", [epochs, "budget.optimizer_steps=100"]))
    assert len(plan_phases(load_config("default", [epochs]))) == 1  # no budget: no check


def test_experiment_files_live_in_conf_experiments_and_the_former_paths_still_work():
    from stagewise_pl.config import EXPERIMENTS_DIR, experiment_file

    assert experiment_file("experiment_skills") == EXPERIMENTS_DIR / "experiment_skills.yaml"
    assert experiment_file(str(EXPERIMENTS_DIR / "experiment.yaml")) == EXPERIMENTS_DIR / "experiment.yaml"
    with pytest.warns(FutureWarning, match="moved to"):
        assert experiment_file("conf/experiment_smollm2.yaml") == EXPERIMENTS_DIR / "experiment_smollm2.yaml"
    assert experiment_file("conf/nothing_here.yaml") is None and experiment_file("nothing") is None
    assert not list(CONF_DIR.glob("experiment*.yaml"))
