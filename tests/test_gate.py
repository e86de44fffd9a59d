"""The development split and the phase gate: a split never trained on or profiled, graded after every training
phase; a phase that lowers its accuracy by more than the margin is rolled back to bit-identical start weights, and a
run killed while the gate grades or restores resumes to the uninterrupted run."""
import json
from types import SimpleNamespace

import pytest

from helpers import fit, outcome, resume, same_weights
from stagewise_pl.callbacks.gate import DevAccuracyGate
from stagewise_pl.config import ConfigError, load_config
from stagewise_pl.data.problems import Problem
from stagewise_pl.phases.dev import carve_dev, stderr
from stagewise_pl.preflight import plan_phases
from stagewise_pl.routing.gate import judge
from stagewise_pl.verify.gold import FLAG

GATE = "{target: stagewise_pl.callbacks.gate:DevAccuracyGate, args: {margin: 0.3}}"
RULES = ("routing.rules=[{target: stagewise_pl.callbacks.rules:RouteByPassRate}, "
         "{target: stagewise_pl.callbacks.rules:NeverSolvedInRL}, " + GATE + "]")


def result(accuracy, scores=None):
    scores = scores or [accuracy] * 10
    return {"accuracy": accuracy, "stderr": stderr(scores), "n": len(scores)}


def test_the_gate_rolls_back_a_drop_beyond_its_margin_and_keeps_the_rest():
    phase = SimpleNamespace(name="g", kind="grpo")
    fixed = DevAccuracyGate(margin=0.05)
    assert fixed.judge(phase, result(0.6), result(0.5), "before").action == "rollback"
    assert fixed.judge(phase, result(0.6), result(0.56), "before").action == "keep"
    assert fixed.judge(phase, result(0.6), result(0.9), "before").action == "keep"
    # the default margin: z standard errors of the accuracy before, from the split's per-problem scores
    spread = [1.0] * 5 + [0.0] * 5  # 0.5, standard error sqrt(0.25 * 10 / 9 / 10) = 0.167
    auto = DevAccuracyGate(z=1.0)
    assert auto.judge(phase, result(0.5, spread), result(0.35, spread), "before").action == "keep"
    decision = auto.judge(phase, result(0.5, spread), result(0.3, spread), "before")
    assert decision.action == "rollback" and decision.margin == pytest.approx(0.1667, abs=1e-4)
    assert DevAccuracyGate(margin=0.0, kinds=["sft"]).judge(phase, result(0.6), result(0.1), "s").action == "keep"
    with pytest.raises(ValueError):
        DevAccuracyGate(margin=-1)
    # the first gate that does not keep decides
    assert judge([DevAccuracyGate(margin=0.5), fixed], phase, result(0.6), result(0.5), "before").gate == fixed.name


def test_the_split_is_seeded_disjoint_and_leaves_problems_to_train_on():
    pool = [Problem(f"p{i}", f"{i} + 0", str(i), "t") for i in range(50)]
    pool[7].meta[FLAG] = "unparseable"  # a problem the verifier cannot grade never goes into the split
    train, dev = carve_dev(pool, 10, seed=3)
    assert len(dev) == 10 and len(train) == 40 and not {p.id for p in dev} & {p.id for p in train}
    assert [p.id for p in carve_dev(pool, 10, seed=3)[1]] == [p.id for p in dev]  # one seed, one split
    assert [p.id for p in carve_dev(pool, 10, seed=4)[1]] != [p.id for p in dev]
    assert carve_dev(pool, 0, seed=3) == (pool, [])
    with pytest.raises(ValueError, match="dev_size"):
        carve_dev(pool, 50, seed=3)
    assert not any("p7" in {p.id for p in carve_dev(pool, 10, seed=s)[1]} for s in range(20))
    assert stderr([1.0] * 8) == 1 / 8  # no spread is not no noise: one problem in n


def test_a_gate_without_a_development_split_is_refused_before_any_work():
    cfg = load_config("default", ["phases=[{name: s, kind: sft, steps: 2}]", RULES])
    with pytest.raises(ConfigError, match="data.dev_size"):
        plan_phases(cfg)
    plan_phases(load_config("default", ["phases=[{name: s, kind: sft, steps: 2}]", RULES, "data.dev_size=16"]))


# ------------------------------------------------------------------ a run
PLAN = ("phases=[{name: s1, kind: sft, steps: 4, lr: 2e-4}, {name: p, kind: profile, limit: 40}, "
        "{name: s2, kind: sft, steps: 4, lr: 0.05}]")  # s2's learning rate wrecks the tiny model
SETTINGS = [PLAN, RULES, "data.dev_size=48", "profile.k=2", "trainer.batch_size=16", "run.keep=all",
            "trainer.checkpoint_every_n_steps=2", "run.deterministic=true", "eval.each_phase=false"]


@pytest.fixture(scope="module")
def gated(tmp_path_factory, base_overrides):
    run_dir = tmp_path_factory.mktemp("gated") / "run"
    out = fit(base_overrides + SETTINGS + [f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


@pytest.mark.slow
def test_a_phase_that_hurts_the_split_is_rolled_back_to_its_start_weights(gated):
    run_dir, out = gated
    routing = {f.name: json.loads(f.read_text()) for f in (run_dir / "routing").glob("*.json")}
    s1, s2 = routing["01-s1.json"]["gate"], routing["03-s2.json"]["gate"]
    assert s1["action"] == "keep" and s1["against"] == "before"
    assert s2["action"] == "rollback" and s2["against"] == "s1" and s2["before"] - s2["after"] > 0.3
    # the weights after the rollback are the weights s2 started from, bit for bit: those s1 left
    assert same_weights(run_dir / "final", run_dir / "export" / "s1")
    assert not same_weights(run_dir / "export" / "s2", run_dir / "export" / "s1")
    # the split: never trained on, never profiled; graded before and after each training phase
    dev = set(json.loads((run_dir / "dev" / "before.json").read_text())["problems"])
    assert len(dev) == 48 and {f.name for f in (run_dir / "dev").glob("*.json")} == {"before.json", "s1.json",
                                                                                     "s2.json"}
    for decision in routing.values():
        assert not dev & set(decision["selected"])
    from stagewise_pl.ledger import DifficultyLedger

    ledger = DifficultyLedger(run_dir / "ledger", "x", writer=False)
    assert not dev & set(ledger.pass_rates("p")) and ledger.rolled_back() == ["s2"]
    # its tokens count: in the summaries, the first training phase's with those of the grading before
    state = json.loads((run_dir / "state.json").read_text())["completed"]
    assert state["s1"]["dev_tokens"] > 0 and state["s1"]["generated_tokens"] == state["s1"]["dev_tokens"]
    assert state["s2"]["gate"] == "rollback" and "rollback" in (run_dir / "summary.md").read_text()
    assert "gate dev_accuracy_gate: rollback" in out.stdout + out.stderr
    assert not list((run_dir / "gate").glob("*.pt"))  # the start weights are removed at the run's end


@pytest.mark.slow
@pytest.mark.parametrize("point", ["gate_grade#2", "gate_restore#1", "gate_cleared"])
def test_a_kill_while_the_gate_grades_or_restores_resumes_to_the_uninterrupted_run(tmp_path, base_overrides, gated,
                                                                                      point):
    args = base_overrides + SETTINGS
    run_dir = tmp_path / "run"
    assert fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": point}).returncode == -9
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert outcome(run_dir) == outcome(gated[0])


RETRY_PLAN = ("phases=[{name: s1, kind: sft, steps: 4, lr: 2e-4}, {name: p, kind: profile, limit: 40}, "
              "{name: s2, kind: sft, steps: 4, lr: 0.05}, {name: s3, kind: sft, steps: 2, lr: 2e-4}]")
RETRY_SETTINGS = [s for s in SETTINGS if not s.startswith(("phases=", "routing.rules="))] + [
    RETRY_PLAN, RULES.replace("{margin: 0.3}", "{margin: 0.3, action: retry}")]


@pytest.fixture(scope="module")
def retried(tmp_path_factory, base_overrides):
    run_dir = tmp_path_factory.mktemp("retried") / "run"
    out = fit(base_overrides + RETRY_SETTINGS + [f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_retry_runs_the_phase_again_from_its_start_at_half_the_learning_rate_once(retried):
    import csv

    routing = {f.name: json.loads(f.read_text()) for f in (retried / "routing").glob("*.json")}
    assert routing["03-s2.json"]["gate"]["action"] == "retry"
    again = routing["03-s2-retry.json"]
    assert again["retry_of"] == "s2" and again["selected"] == routing["03-s2.json"]["selected"]
    assert again["gate"]["action"] in ("keep", "rollback") and again["gate"]["against"] == "s1"  # never retried twice
    done = json.loads((retried / "state.json").read_text())["completed"]
    assert list(done) == ["s1", "p", "s2", "s2-retry", "s3"] and done["s2-retry"]["steps"] == 4
    rows = list(csv.DictReader(open(retried / "logs" / "metrics.csv")))
    peak = {name: max(float(r[f"{name}/train/lr"]) for r in rows if r.get(f"{name}/train/lr")) for name in
            ("s2", "s2-retry")}
    assert peak["s2-retry"] == pytest.approx(peak["s2"] / 2)
    assert json.loads((retried / "ledger" / "rolled_back.json").read_text())[0] == "s2"


@pytest.mark.slow
def test_a_kill_inside_a_retried_phase_resumes_to_the_uninterrupted_run(tmp_path, base_overrides, retried):
    args = base_overrides + RETRY_SETTINGS
    run_dir = tmp_path / "run"
    assert fit(args + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "step:s2-retry:3"}).returncode == -9
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert outcome(run_dir) == outcome(retried)
