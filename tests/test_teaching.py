"""bridge_sft and cft phases in real fits on the tiny base model: what they write, what they log, how a
killed run resumes them, and the CFT data's quality (diagnoses name the first wrong step, repairs verify)."""
import json
import re
from pathlib import Path

import pytest

from stagewise_pl.config import VerifierConfig, load_config
from stagewise_pl.tasks.arithmetic import ArithmeticTask
from stagewise_pl.verify import make_verifier
from helpers import fit, same_weights

PLAN = ("phases=[{name: p, kind: profile}, {name: b, kind: bridge_sft, select: hard, steps: 4, lr: 5e-4}, "
        "{name: g, kind: grpo, select: medium, steps: 2, lr: 1e-5}, "
        "{name: c, kind: cft, select: unsolved_in_rl, replay: 0.5, steps: 3, lr: 1e-4}, {name: e, kind: eval}]")


@pytest.fixture
def teach_overrides(base_overrides):
    return base_overrides + [PLAN, "profile.limit=96", "profile.k=4", "trainer.batch_size=16",
                             "grpo.prompts_per_step=8", "grpo.num_generations=4", "bridge.samples=2",
                             "trainer.checkpoint_every_n_steps=2", "run.deterministic=true", "eval.each_phase=false"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # a run, a kill and a resume of both teaching phases
def test_bridge_and_cft_phases_run_log_and_resume_on_the_same_data(tmp_path_factory, teach_overrides):
    straight = tmp_path_factory.mktemp("straight")
    out = fit(teach_overrides + [f"run.dir={straight}"])
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((straight / "state.json").read_text())
    bridge = json.loads((straight / "bridge" / "02-b.summary.json").read_text())
    assert state["completed"]["b"]["strategy"] == "student_rewrite" and bridge["problems"] > 0
    assert bridge["kept"] + bridge["fell_back_to_raw"] + bridge["dropped"] == bridge["problems"]
    assert sum(bridge["candidates"].values()) == 2 * bridge["problems"]  # every sample judged and counted
    assert bridge["nll_raw"] is not None and bridge["nll_target"] is not None
    trained = rows(straight / "bridge" / "02-b.jsonl")
    assert {r["kind"] for r in trained} <= {"bridged", "raw"}
    assert len(trained) == bridge["kept"] + bridge["fell_back_to_raw"]
    assert all(r["target"] == r["raw"] for r in trained if r["kind"] == "raw")
    metrics = (straight / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "b/bridge/acceptance" in metrics and "b/bridge/nll_target" in metrics
    cft = json.loads((straight / "cft" / "04-c.summary.json").read_text())
    assert cft["problems"] > 0 and set(cft["kept"]) == {"diagnosis", "repair", "trace"}
    assert state["completed"]["c"]["steps"] == 3 and state["finished"]
    assert "bridge student_rewrite:" in out.stdout and "CFT data from" in out.stdout

    # killed in the middle of each: the resumed run trains on the rows made before the kill, never remade
    for point, phase in [("step:b:3", "b"), ("step:c:1", "c")]:
        killed = tmp_path_factory.mktemp("killed")
        out = fit(teach_overrides + [f"run.dir={killed}"], {"STAGEWISE_FAULT": point})
        assert out.returncode == -9, out.stderr[-3000:]
        resumed = fit(teach_overrides + [f"run.dir={killed}", "resume=last"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        made = "bridge student_rewrite:" if phase == "b" else "CFT data from"
        assert made not in resumed.stdout, "the resumed run made its rows again"
        folder = "bridge/02-b.jsonl" if phase == "b" else "cft/04-c.jsonl"
        assert rows(killed / folder) == rows(straight / folder)
        assert same_weights(straight / "final", killed / "final")


def first_wrong_line(expr: str, solution: str) -> int:
    """1-based line of the first wrong step, by an evaluator written apart from the task's own;
    len(steps) + 1 when every step is right and only the final answer is wrong or missing."""
    tokens = re.findall(r"\d+|[+\-]", expr)
    value, lines = int(tokens[0]), [ln.strip() for ln in solution.split("####")[0].strip().splitlines() if ln.strip()]
    for i in range(1, len(tokens), 2):
        op, x = tokens[i], int(tokens[i + 1])
        new = value + x if op == "+" else value - x
        step = (i + 1) // 2
        if step > len(lines) or lines[step - 1].replace(" ", "") != f"{value}{op}{x}={new}":
            return step
        value = new
    return len(tokens) // 2 + 1


@pytest.mark.slow  # ~18 s (the fast tier stays within 8 minutes)
def test_cft_diagnoses_name_the_first_wrong_step_and_every_kept_repair_verifies(tmp_path, base_overrides):
    run_dir = tmp_path / "cft"
    out = fit(base_overrides + [f"run.dir={run_dir}", "profile.limit=160", "profile.k=4", "trainer.batch_size=16",
                                "phases=[{name: p, kind: profile}, {name: c, kind: cft, select: hard, steps: 1}]",
                                "eval.each_phase=false"])
    assert out.returncode == 0, out.stderr[-3000:]
    pool = {p.id: p for p in ArithmeticTask.from_config(load_config("default").task).split("train")}
    made = rows(run_dir / "cft" / "02-c.jsonl")
    diagnoses = [r for r in made if r["kind"] == "diagnosis"]
    assert len(diagnoses) >= 50
    for r in diagnoses:
        expr = pool[r["problem_id"]].prompt
        step, steps = first_wrong_line(expr, r["failure"]), len(re.findall(r"[+\-]", expr))
        named = re.search(r"Step (\d+) is (wrong|missing)", r["target"])
        if step <= steps:
            assert named and int(named.group(1)) == step, (r["failure"], r["target"])
        else:
            assert named is None and "final answer" in r["target"], (r["failure"], r["target"])
        assert r["target"].endswith("Verdict: incorrect") and r["failure"] in r["prompt"]
    verifier = make_verifier(VerifierConfig(name="exact"))
    summary = json.loads((run_dir / "cft" / "02-c.summary.json").read_text())
    repairs = [r for r in made if r["kind"] == "repair"]
    assert len(repairs) == summary["kept"]["repair"] > 0
    assert sum(summary["outcomes"]["repair"].values()) == len(diagnoses) + summary["outcomes"]["repair"]["no_diagnosis"]
    for r in repairs:
        assert verifier.score(r["target"], pool[r["problem_id"]].answer).reason == "correct", r
        assert r["failure"] in r["prompt"]
    # what the teacher wrote: one critique per failure, one trace per problem (repairs are the student's here)
    done = json.loads((run_dir / "state.json").read_text())["completed"]
    written = sum(summary["outcomes"]["diagnosis"].values()) + summary["bridge"]["problems"]
    assert summary["teacher_texts"] == done["c"]["teacher_texts"] == written > 0
    assert done["p"].get("teacher_texts", 0) == 0


@pytest.mark.slow  # DDP is in the fast tier by test_stages
def test_two_ddp_processes_train_bridge_and_cft_on_the_same_rows(tmp_path, teach_overrides):
    """Rank 0 makes the rows (the student's rewrites, the critiques) and broadcasts them: both ranks train on
    the same rows and end with the same weights."""
    run_dir = tmp_path / "ddp"
    out = fit(teach_overrides + [f"run.dir={run_dir}", "trainer.strategy=ddp", "trainer.devices=2",
                                 "trainer.accelerator=cpu", "run.threads=1", "run.deterministic=false"], timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((run_dir / "routing" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and {"b", "c", "final weights"} <= set(ranks[0])
    assert out.stdout.count("bridge student_rewrite:") == 1 and out.stdout.count("CFT data from") == 1
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["completed"]["b"]["kept"] == len(rows(run_dir / "bridge" / "02-b.jsonl"))
