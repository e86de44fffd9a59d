"""The plan, the routing rules and the phase manager: pure plan checks, routing on hand-made ledgers,
a rule from a module only this test has, a resume in the same phase at the same step, refusals,
and the plan across two DDP processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from stagewise_pl.callbacks.promote import PromoteAboveThreshold
from stagewise_pl.callbacks.rules import NeverSolvedInRL, RouteByPassRate
from stagewise_pl.config import ConfigError, PhaseConfig, load_config
from stagewise_pl.data.problems import Problem
from stagewise_pl.ledger import DifficultyLedger
from stagewise_pl.phases import kind_traits
from stagewise_pl.plan import PhaseSpec, RuleInfo, build_plan, describe, fingerprint
from stagewise_pl.run import Run
from stagewise_pl.routing import RoutingView, route

from helpers import fit, fit_ddp, hand_ledger

KINDS = kind_traits()  # the registered kinds and their traits
RULES = [RuleInfo("route_by_pass_rate", ("hard", "medium", "easy"), "profile"),
         RuleInfo("never_solved_in_rl", ("unsolved_in_rl",), "grpo")]


def phase(kind, **kw):
    return PhaseConfig(kind=kind, **kw)


# ------------------------------------------------------------------ the plan, without a Trainer
def test_the_method_plan_is_checked_and_named():
    plan = build_plan([phase("profile"), phase("sft", select="hard", epochs=2.0), phase("profile"),
                       phase("grpo", select="medium", steps=30, lr=1e-4, temperature=0.9),
                       phase("sft", select="unsolved_in_rl", steps=20, name="repair"), phase("eval")], KINDS, RULES)
    assert [p.name for p in plan] == ["1-profile", "2-sft", "3-profile", "4-grpo", "repair", "6-eval"]
    assert plan[3] == PhaseSpec(4, "4-grpo", "grpo", "medium", 30, 0.0, 1e-4, None, 0.9, 0)
    assert plan[1].step_count(n_items=100, batch_size=16) == 12 and plan[3].step_count(100, 16) == 30
    assert build_plan([phase("sft", select="pkg.rules:Mine")], KINDS, RULES)[0].select == "pkg.rules:Mine"
    lines = describe(plan, KINDS)
    assert lines[1] == "2-sft: sft on hard, 2 epochs" and lines[3].startswith("4-grpo: grpo on medium, 30 steps, lr")


def test_passes_size_a_phase_to_its_bucket_within_its_share_and_carry_the_rest():
    plan = build_plan([phase("profile"), phase("sft", select="hard", steps=20, passes=2.0),
                       phase("profile"), phase("grpo", select="medium", steps=10), phase("grpo", name="g2")],
                      KINDS, RULES)
    cft = plan[1]
    assert cft.carry_to == "4-grpo"  # the next phase that spends a token budget
    assert cft.step_count(n_items=6, batch_size=16) == 1 and cft.step_count(100, 16) == 12  # 2 passes
    assert cft.step_count(1000, 16) == 20 and cft.step_count(0, 16) == 0  # at most its share; nothing to pass over
    assert "2 passes, at most 20 steps (the rest to 4-grpo)" in describe(plan, KINDS)[1]
    named = build_plan([phase("sft", steps=8, passes=1.0, carry_to="b"), phase("sft", name="b", steps=3)], KINDS)
    assert named[0].carry_to == "b"
    from stagewise_pl.plan import carried_steps

    done = {"1-sft": {"carried_steps": 5, "carried_to": "b"}, "b": {"carried_steps": 9, "carried_to": "b"}}
    assert carried_steps(named, named[1], done) == 5  # only earlier phases give
    plain = build_plan([phase("sft", steps=8)], KINDS)
    assert fingerprint(plain, [], "d") != fingerprint(build_plan([phase("sft", steps=8, passes=1.0)], KINDS), [], "d")
    for bad, message in (([phase("grpo", passes=1.0)], "phases.0.passes: only supervised"),
                         ([phase("sft", epochs=1.0, passes=1.0)], "not with epochs"),
                         ([phase("sft", carry_to="x")], "carry_to: only a phase with passes"),
                         ([phase("sft", passes=1.0, carry_to="x"), phase("sft", name="y")],
                          "carry_to='x': not a later"),
                         ([phase("sft", name="y"), phase("sft", passes=1.0, carry_to="y")], "not a later")):
        with pytest.raises(ConfigError, match=message):
            build_plan(bad, KINDS)


@pytest.mark.slow
def test_a_phase_with_passes_gives_its_unused_steps_to_the_phase_named(tmp_path, base_overrides):
    run = tmp_path / "run"
    out = fit(base_overrides + ["eval.each_phase=false", "profile.k=4", "profile.limit=24", "trainer.batch_size=16",
                                "phases=[{name: p, kind: profile}, {name: a, kind: sft, select: hard, steps: 10, "
                                "passes: 1.0, carry_to: b}, {name: b, kind: sft, steps: 2}]", f"run.dir={run}"])
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads((run / "state.json").read_text())["completed"]
    hard = json.loads((run / "routing" / "02-a.json").read_text())["counts"]["hard"]
    assert 0 < hard <= 24 and done["a"]["steps"] == max(1, round(hard / 16))  # one pass over its bucket
    assert done["a"]["carried_to"] == "b" and done["a"]["steps"] + done["a"]["carried_steps"] == 10
    assert done["b"]["steps"] == 2 + done["a"]["carried_steps"]


@pytest.mark.parametrize("phases,message", [
    ([phase("cft")], "phases.0: a cft phase reads failed rollouts .* no phase that records them "
                     "\\(grpo or hinted or hpt or luffy or profile or relift\\) comes before"),
    ([phase("profile"), phase("bridge_sft", select="hard", steps=0)], "phases.1: bridge_sft phases need steps"),
    ([phase("distill")], "phases.0.kind: unknown phase kind 'distill'"),
    ([phase("profile"), phase("sft", select="tricky")], "phases.1.select='tricky': no routing rule builds"),
    ([phase("sft", select="hard")], "phases.0.select='hard': .* no profile phase comes before"),
    ([phase("profile"), phase("sft", select="unsolved_in_rl")], "no grpo phase comes before phase 1"),
    ([phase("grpo", epochs=1.0)], "phases.0.epochs: only supervised phases \\(bridge_sft, cft, sft\\)"),
    ([phase("sft", steps=0)], "phases.0: sft phases need steps > 0 or epochs > 0"),
    ([phase("sft", name="a"), phase("grpo", name="a")], "names must be unique"),
    ([], "at least one phase"),
])
def test_bad_plans_are_refused_before_any_work(phases, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(phases, KINDS, RULES)


def test_the_fingerprint_follows_plan_rules_and_data():
    plan = build_plan([phase("profile"), phase("grpo", select="medium")], KINDS, RULES)
    other = build_plan([phase("profile"), phase("grpo", select="medium", steps=99)], KINDS, RULES)
    base = fingerprint(plan, [{"target": "r"}], "data1")
    assert base == fingerprint(plan, [{"target": "r"}], "data1")
    assert len({base, fingerprint(other, [{"target": "r"}], "data1"), fingerprint(plan, [{"target": "s"}], "data1"),
                fingerprint(plan, [{"target": "r"}], "data2")}) == 4


# ------------------------------------------------------------------ rules on hand-made ledgers
def view_of(ledger, done, pool_ids, next_kind="sft"):
    pool = {pid: Problem(id=pid, prompt=pid, answer="1", source="hand") for pid in pool_ids}
    return RoutingView(ledger, pool, done, PhaseSpec(len(done) + 1, "next", next_kind))


def test_route_by_pass_rate_buckets_the_latest_profile(tmp_path):
    ledger = hand_ledger(tmp_path / "ledger", {
        "1-profile": ("profile", 1, {"a": [0, 0, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 1, 1], "d": [0, 0, 0, 0]}),
        "3-profile": ("profile", 3, {"a": [1, 0, 0, 0], "b": [1, 1, 1, 0], "c": [1, 1, 1, 1], "d": [0, 0, 0, 0]}),
    })
    done = [PhaseSpec(1, "1-profile", "profile"), PhaseSpec(2, "2-sft", "sft"), PhaseSpec(3, "3-profile", "profile")]
    view = view_of(ledger, done, ["a", "b", "c", "d", "e"])
    assert route([RouteByPassRate()], view) == {"hard": ["d"], "medium": ["a", "b"], "easy": ["c"]}
    # before the second profile, the first one decides
    assert route([RouteByPassRate()], view_of(ledger, done[:2], "abcde")) == \
        {"hard": ["a", "d"], "medium": ["b"], "easy": ["c"]}
    # thresholds: p <= 0.25 is hard, p >= 0.75 easy
    assert route([RouteByPassRate(hard_max=0.25, easy_min=0.75)], view) == \
        {"hard": ["a", "d"], "medium": [], "easy": ["b", "c"]}
    # problems no longer in the pool are not routed; no profile yet: empty buckets
    assert route([RouteByPassRate()], view_of(ledger, done, ["a", "c"]))["medium"] == ["a"]
    assert route([RouteByPassRate()], view_of(ledger, [], "abcd")) == {"hard": [], "medium": [], "easy": []}
    with pytest.raises(TypeError, match="hard_max < easy_min"):
        RouteByPassRate(hard_max=0.5, easy_min=0.5)


def test_never_solved_in_rl_and_a_rule_that_holds_problems_back(tmp_path):
    ledger = hand_ledger(tmp_path / "ledger", {
        "1-profile": ("profile", 1, {"a": [0] * 4, "b": [0] * 4, "c": [1, 0, 0, 0], "d": [1, 1, 0, 0]}),
        "2-grpo": ("grpo", 2, {"a": [0] * 8, "c": [0] * 4 + [1] + [0] * 3, "d": [0] * 8}),
        "3-profile": ("profile", 3, {"a": [0] * 4, "b": [1, 0, 0, 0], "c": [1, 1, 0, 0], "d": [1, 0, 0, 0]}),
    })
    done = [PhaseSpec(1, "1-profile", "profile"), PhaseSpec(2, "2-grpo", "grpo"), PhaseSpec(3, "3-profile", "profile")]
    view = view_of(ledger, done, "abcd")
    assert route([NeverSolvedInRL()], view) == {"unsolved_in_rl": ["a", "d"]}
    # promotion to RL needs a pass rate of 0.5: b (0.25) and d (0.25) stay with SFT; c was below it before: promoted
    buckets = route([RouteByPassRate(), PromoteAboveThreshold(threshold=0.5)], view)
    assert buckets == {"hard": ["a", "b", "d"], "medium": ["c"], "easy": [], "promoted": ["c"]}


def test_a_rule_must_return_pool_ids(tmp_path):
    class Wrong(RouteByPassRate):
        def route(self, view, buckets):
            return {"hard": ["nope"]}

    ledger = hand_ledger(tmp_path / "ledger", {"1-profile": ("profile", 1, {"a": [0]})})
    with pytest.raises(ValueError, match="not in the pool: \\['nope'\\]"):
        route([Wrong()], view_of(ledger, [PhaseSpec(1, "1-profile", "profile")], "a"))


# ------------------------------------------------------------------ runs
PLAN = ("phases=[{kind: profile, limit: 40}, {kind: sft, select: hard, steps: 4}, {kind: profile, limit: 40}, "
        "{kind: grpo, select: medium, steps: 3, lr: 1e-4}, {kind: eval}]")


@pytest.fixture
def plan_overrides(base_overrides):
    # the real base model: its profile has easy, medium and hard problems
    return base_overrides + [PLAN, "trainer.batch_size=16", "profile.k=4", "grpo.prompts_per_step=4",
                             "grpo.num_generations=4", "grpo.max_new_tokens=24", "eval.k=0",
                             "trainer.checkpoint_every_n_steps=2", "run.deterministic=true"]


def test_one_launch_runs_the_plan_and_routes_by_the_ledger(tmp_path, plan_overrides):
    run_dir = tmp_path / "plan"
    Run(load_config("default", plan_overrides + [f"run.dir={run_dir}"]), log=lambda *_: None).execute()
    state = json.loads((run_dir / "state.json").read_text())
    assert list(state["completed"]) == ["1-profile", "2-sft", "3-profile", "4-grpo", "5-eval"] and state["finished"]
    ledger = DifficultyLedger(run_dir / "ledger", "x")
    first = ledger.pass_rates("1-profile")
    routing = json.loads((run_dir / "routing" / "02-2-sft.json").read_text())
    # the SFT phase trained exactly on the problems the first profile never solved
    assert routing["selected"] == sorted(pid for pid, p in first.items() if p == 0.0) == routing["ids"]["hard"]
    assert routing["counts"]["hard"] + routing["counts"]["medium"] + routing["counts"]["easy"] == 40
    assert state["completed"]["2-sft"]["problems"] == len(routing["selected"]) > 0
    grpo_routing = json.loads((run_dir / "routing" / "04-4-grpo.json").read_text())
    second = ledger.pass_rates("3-profile")
    assert grpo_routing["selected"] == sorted(pid for pid, p in second.items() if 0 < p < 1)
    assert {r["problem_id"] for r in ledger.table().to_pylist() if r["phase"] == "4-grpo"} <= \
        set(grpo_routing["selected"])
    assert state["completed"]["4-grpo"]["buckets"] == grpo_routing["counts"]
    for label in ["2-sft", "4-grpo", "5-eval"]:  # evaluated after each training phase and at the eval phase
        assert (run_dir / "eval" / f"{label}.json").is_file()
    assert not (run_dir / "eval" / "1-profile.json").exists()
    summary = (run_dir / "summary.md").read_text()
    assert "2-sft pass@1" in summary and "5-eval pass@1" in summary


@pytest.mark.slow  # kill-resume stays in the fast tier by test_grpo and test_ledger
def test_a_resume_continues_in_the_same_phase_at_the_same_step(tmp_path, plan_overrides):
    run_dir = tmp_path / "r"
    out = fit(plan_overrides + [f"run.dir={run_dir}"], {"STAGEWISE_FAULT": "step:4-grpo:3"})
    assert out.returncode == -9
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PhaseManager"]
    assert state["phase"] == 3 and state["runner"]["position"] == 2  # checkpointed after step 2
    assert len(DifficultyLedger(run_dir / "ledger", "x").parts()) > state["ledger"]["parts"]  # step 3 recorded
    out = fit(plan_overrides + [f"run.dir={run_dir}", "resume=last"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase 4-grpo: grpo on medium" in out.stdout and "resuming at step 2" in out.stdout
    assert "phase 2-sft: sft" not in out.stdout  # finished phases are not rerun


@pytest.mark.slow  # four runs
def test_a_changed_plan_or_data_is_refused_unless_forced(tmp_path, fast_overrides):
    rows = tmp_path / "pool.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i} + 1", "answer": str(i + 1),
                                        "solution": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n" for i in range(12)))
    args = fast_overrides + [f"run.dir={tmp_path / 'r'}", "data.source=jsonl", f"data.path={rows}",
                             "data.fields={id: id, prompt: prompt, answer: answer, solution: solution}",
                             "data.target=reference", "eval.k=0", "eval.before=false", "eval.each_phase=false",
                             "phases=[{kind: sft, steps: 4}, {kind: sft, steps: 4}]",
                             "trainer.checkpoint_every_n_steps=2"]
    assert fit(args, {"STAGEWISE_FAULT": "checkpoint:2-sft:2"}).returncode == -9
    changed = fit(args + ["resume=last", "phases.1.steps=6"])
    assert changed.returncode == 2 and "configuration differs" in changed.stderr and "phases.1.steps" in changed.stderr
    rows.write_text(rows.read_text().replace('"answer": "3"', '"answer": "4"'))
    data = fit(args + ["resume=last"])
    assert data.returncode == 2 and "training data differs" in data.stderr
    forced = fit(args + ["resume=last", "run.force=true"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "run.force=true" in forced.stdout and json.loads((tmp_path / "r" / "state.json").read_text())["finished"]


RULE_MODULE = '''
import lightning as L

from stagewise_pl.routing import RoutingRule


class StepsAtEnd(L.Callback):
    """A plain user callback (trainer.callbacks): writes the optimizer steps the fit made."""

    def on_train_end(self, trainer, pl_module):
        with open("steps-at-end.txt", "w") as handle:
            handle.write(str(trainer.global_step))


class FirstSampleFailed(RoutingRule):
    """Routes the problems whose first sample in the latest profile was not correct to 'retry'."""
    buckets = ("retry",)
    reads = "profile"

    def __init__(self, sample=0):
        self.sample = sample

    def route(self, view, buckets):
        name = view.last("profile").name
        rows = view.ledger.table().to_pylist()
        return {**buckets, "retry": [r["problem_id"] for r in rows if r["phase"] == name
                                     and r["sample_index"] == self.sample and r["reason"] != "correct"]}
'''


def fit_with_the_rule_module(tmp_path, fast_overrides, run_dir, *args):
    """A run whose rule module exists only in ``tmp_path`` (on PYTHONPATH, the working directory)."""
    (tmp_path / "my_rules_for_this_test.py").write_text(RULE_MODULE)
    out = subprocess.run(
        [sys.executable, "-m", "stagewise_pl.fit", *fast_overrides, f"run.dir={run_dir}", "eval.k=0",
         "eval.before=false", "profile.k=4", *args],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(tmp_path)), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow  # a rule by dotted path stays in the fast tier by test_a_phase_selects_by_naming_a_rule
def test_a_rule_from_a_module_only_this_test_has(tmp_path, fast_overrides):
    run_dir = tmp_path / "custom"
    out = fit_with_the_rule_module(
        tmp_path, fast_overrides, run_dir,
        "routing.rules=[{target: my_rules_for_this_test:FirstSampleFailed, args: {sample: 1}}]",
        "trainer.callbacks=[my_rules_for_this_test:StepsAtEnd]",
        "phases=[{kind: profile, limit: 30}, {kind: sft, select: retry, steps: 2}]")
    rows = DifficultyLedger(run_dir / "ledger", "x").table().to_pylist()
    decision = json.loads((run_dir / "routing" / "02-2-sft.json").read_text())
    expected = sorted(r["problem_id"] for r in rows if r["sample_index"] == 1 and r["reason"] != "correct")
    assert decision["rules"] == ["FirstSampleFailed"] and decision["selected"] == expected and expected
    assert f"buckets: retry {len(expected)}" in out.stdout
    assert (tmp_path / "steps-at-end.txt").read_text() == "2"  # the user callback ran inside the one fit
    bad = fit(fast_overrides + [f"run.dir={tmp_path / 'bad'}", "routing.rules=[{target: no_such_module:Rule}]"])
    assert bad.returncode == 2 and "routing.rules.0.target: cannot import 'no_such_module'" in bad.stderr
    bad = fit(fast_overrides + [f"run.dir={tmp_path / 'bad'}", "phases=[{kind: sft, select: 'no_such_module:R'}]"])
    assert bad.returncode == 2 and "phases.0.select='no_such_module:R': cannot import" in bad.stderr


def test_a_phase_selects_by_naming_a_rule(tmp_path, fast_overrides):
    run_dir = tmp_path / "by-rule"
    fit_with_the_rule_module(
        tmp_path, fast_overrides, run_dir,
        "phases=[{kind: profile, limit: 30}, {kind: sft, select: 'my_rules_for_this_test:FirstSampleFailed', "
        "steps: 2}]")
    rows = DifficultyLedger(run_dir / "ledger", "x").table().to_pylist()
    decision = json.loads((run_dir / "routing" / "02-2-sft.json").read_text())
    expected = sorted(r["problem_id"] for r in rows if r["sample_index"] == 0 and r["reason"] != "correct")
    assert decision["selected"] == expected and expected  # the rule's bucket, built with its defaults
    assert decision["ids"]["retry"] == expected and "hard" in decision["ids"]  # beside the configured rules'



@pytest.mark.slow  # two gloo processes: ~30 s (the fast tier stays within 8 minutes)
def test_two_ddp_processes_run_the_plan_with_one_ledger_and_one_routing(tmp_path, plan_overrides):
    run_dir = tmp_path / "ddp"
    # the same routing on both ranks, and the same weights at the end (sequential profiles under DDP: test_profile)
    out, digests = fit_ddp(plan_overrides + ["profile.sequential=false"], run_dir)
    table = DifficultyLedger(run_dir / "ledger", "x").table().to_pylist()
    for name in ["1-profile", "3-profile"]:  # sharded across the ranks, merged: every problem k times, once each
        keys = [(r["problem_id"], r["sample_index"]) for r in table if r["phase"] == name]
        assert len(keys) == 40 * 4 and len(set(keys)) == len(keys)
    assert set(digests) == {"1-profile", "2-sft", "3-profile", "4-grpo", "5-eval", "final weights"}
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["completed"]["4-grpo"]["steps"] == 3
    assert out.stdout.count("phase 2-sft done") == 1  # one voice


@pytest.mark.slow  # the default plan, shortened: ~16 s
def test_the_default_conf_is_the_method_in_two_rounds():
    from stagewise_pl.preflight import plan_phases

    cfg = load_config("default")
    plan = plan_phases(cfg)
    round_ = [("profile", "all"), ("bridge_sft", "hard"), ("profile", "all"), ("grpo", "medium")]
    # Bridge SFT -> RL -> CFT -> RL: the second round starts from what the first one's RL never solved
    assert [(p.kind, p.select) for p in plan] == round_ + [("cft", "unsolved_in_rl")] + round_ + [("eval", "all")]
    assert (cfg.teacher.name, cfg.teacher.style, cfg.bridge.strategy) == ("programmatic", "chunked",
                                                                                   "student_rewrite")
    out = fit(["--dry-run", "teacher.name=nobody"])
    assert out.returncode == 2 and "teacher.name: unknown teacher 'nobody'" in out.stderr
    out = fit(["--dry-run", "bridge.strategy=nope"])  # a registry's names are the config's allowed values
    assert out.returncode == 2
    assert "'bridge.strategy': 'nope' is not registered; registered: min_nll_select" in out.stderr
