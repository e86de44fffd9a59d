"""The phase core without a Trainer: traits drive the plan check, selection is a pure function, the token budget
is arithmetic, one definition of the buckets; and end to end, a supervised kind registered outside the package
runs with epochs and replay, a deprecated callbacks path still loads, and a run of the former format is refused;
the guarded optimizer step clips by the gradient norm it checked, and an SFT phase trains under bf16-mixed."""
import json

import pytest
import torch

from stagewise_pl.buckets import PassRateBands
from stagewise_pl.config import ConfigError, PhaseConfig, load_config
from stagewise_pl.data.problems import Problem
from stagewise_pl.nonfinite import NonFiniteGuard, grad_norm
from stagewise_pl.phases import PHASES, SFTRunner, kind_traits
from stagewise_pl.phases import token_budget
from stagewise_pl.plan import PhaseSpec, PhaseTraits, RuleInfo, build_plan
from stagewise_pl.routing.selection import select_problems

from helpers import hand_ledger

PROFILE_RULE = [RuleInfo("route_by_pass_rate", ("hard", "medium", "easy"), "profile")]


def pool(n=10, levels=(1, 2)):
    return [Problem(id=f"p{i}", prompt=f"{i}+1", answer=str(i + 1), source="t", level=levels[i % len(levels)])
            for i in range(n)]


# ------------------------------------------------------------------ traits
def test_the_plan_check_reads_traits_not_kind_names():
    traits = dict(kind_traits(), mine=PhaseTraits(trains=True, supervised=True),
                  critic=PhaseTraits(reads_rollouts=True), sampler=PhaseTraits(records_rollouts=True, step_unit=""))
    plan = build_plan([PhaseConfig("profile"), PhaseConfig("mine", select="hard", epochs=2.0, replay=0.3)],
                      traits, PROFILE_RULE)
    assert plan[1].kind == "mine" and plan[1].epochs == 2.0 and plan[1].replay == 0.3
    with pytest.raises(ConfigError, match="phases.0.epochs: only supervised phases"):
        build_plan([PhaseConfig("sampler", epochs=1.0)], traits)
    with pytest.raises(ConfigError, match="no phase that records them .* comes before phase 0"):
        build_plan([PhaseConfig("critic")], traits)
    assert build_plan([PhaseConfig("sampler"), PhaseConfig("critic")], traits)[1].name == "2-critic"
    assert build_plan([PhaseConfig("a.b:Distill")], {"a.b:Distill": PhaseTraits()})[0].name == "1-distill"


def test_every_registered_kind_declares_its_traits():
    traits = kind_traits()
    assert {k for k, t in traits.items() if t.supervised} == {"sft", "bridge_sft", "cft"}
    rl = {"grpo", "hpt", "relift", "luffy", "hinted"}
    assert {k for k, t in traits.items() if t.records_rollouts} == {"profile"} | rl
    assert {k for k, t in traits.items() if t.token_budgeted} == rl
    assert {k for k, t in traits.items() if t.uses_teacher} == {"bridge_sft", "cft"} | rl - {"grpo"}
    assert [k for k, t in traits.items() if not t.uses_pool] == ["eval"]


# ------------------------------------------------------------------ selection, a pure function
def test_selection_filters_limits_and_replays_by_seed():
    problems = pool(20)
    spec = PhaseSpec(3, "3-sft", "sft", select="hard", replay=0.5, limit=4)
    chosen = {f"p{i}" for i in range(0, 20, 2)}  # 10 in the bucket
    first = select_problems(spec, SFTRunner.traits, problems, chosen, seed=7, levels=["1"])
    again = select_problems(spec, SFTRunner.traits, problems, chosen, seed=7, levels=["1"])
    assert first.decision() == again.decision()  # a pure function of its inputs
    picked, replay = first.selected[:4], first.selected[4:]
    assert all(p.id in chosen and p.level == 1 for p in picked)  # the bucket, at the kind's levels, limited
    # replay: half the examples, from the problems the phase did not pick (the bucket's others included)
    assert len(replay) == 4 and not {p.id for p in replay} & {p.id for p in picked}
    other = select_problems(spec, SFTRunner.traits, problems, chosen, seed=8, levels=["1"])
    assert other.decision()["selected"] != first.decision()["selected"]
    none = select_problems(spec, SFTRunner.traits, problems, chosen, seed=7, levels=["9"])
    assert none.error and "levels=['9']" in none.error and not none.selected


def test_own_replay_takes_solved_problems_with_one_of_their_solutions():
    problems = pool(12)
    spec = PhaseSpec(2, "2-sft", "sft", select="hard", replay=0.5)
    solved = {"p7": ["7+1=8 #### 8"], "p9": ["a #### 10", "b #### 10"]}
    sel = select_problems(spec, SFTRunner.traits, problems, {"p0", "p1"}, seed=0, solved=solved)
    assert set(sel.replay) == {"p7", "p9"} and sel.replay_targets["p7"] == "7+1=8 #### 8"
    assert sel.replay_targets["p9"] in solved["p9"]
    assert not select_problems(spec, SFTRunner.traits, problems, {"p0"}, seed=0, solved={}).replay


def test_select_all_and_a_held_out_phase():
    problems = pool(6)
    everything = select_problems(PhaseSpec(1, "1-grpo", "grpo"), PHASES.get("grpo").traits, problems, None, 0)
    assert [p.id for p in everything.selected] == [p.id for p in problems] and everything.decision()["counts"] == {}
    held_out = select_problems(PhaseSpec(2, "2-eval", "eval"), PHASES.get("eval").traits, problems, None, 0)
    assert held_out.selected == [] and held_out.decision()["rules"] == []


# ------------------------------------------------------------------ the token budget, arithmetic
def test_the_token_budget_spreads_what_is_left_over_the_steps_to_come():
    traits = kind_traits()
    plan = [PhaseSpec(1, "p", "profile"), PhaseSpec(2, "g", "grpo", steps=10), PhaseSpec(3, "c", "cft"),
            PhaseSpec(4, "p2", "profile"), PhaseSpec(5, "g2", "grpo", steps=5)]
    completed = {"p": {"generated_tokens": 4000, "rollouts": 400}}
    before = token_budget.spent_before(completed, plan, plan[1], traits, default_per_sample=32)
    # the later profile is estimated as the earlier one cost; the cft phase has no earlier one: 0
    assert before == token_budget.SpentBefore(tokens=4000, reserve=4000, per_sample=10.0)
    assert token_budget.budgeted_steps_after(plan, plan[1], traits) == 5
    # 100 000 - 4000 - 0 - 4000 = 92 000 over 10 + 5 steps, a group of 8 samples of 10 tokens: 76.7 -> 77 prompts
    assert token_budget.prompts_for_step(100_000, before, 0, 10, 5, 0, 0, 10.0, 8, 256) == 77
    # half the rollout steps so far made no update: twice as many steps to come
    assert token_budget.prompts_for_step(100_000, before, 0, 10, 5, 4, 2, 10.0, 8, 256) == 38
    # steps that sample nothing count too (relift's SFT steps): 2 rollout steps for 4 counted steps, half as many
    # rollout steps to come
    assert token_budget.prompts_for_step(100_000, before, 0, 10, 5, 2, 4, 10.0, 8, 256) == 153
    # no update yet after 3 rollout steps: three times as many steps to come
    assert token_budget.prompts_for_step(100_000, before, 0, 10, 5, 3, 0, 10.0, 8, 256) == 26
    assert token_budget.prompts_for_step(100_000, before, 0, 10, 5, 0, 0, 10.0, 8, 50) == 50  # the cap
    assert token_budget.prompts_for_step(8_010, before, 0, 10, 5, 0, 0, 10.0, 8, 50) == 1  # 10 tokens left: at least 1
    # nothing left: the phase ends
    assert token_budget.prompts_for_step(8_000, before, 0, 10, 5, 0, 0, 10.0, 8, 50) == 0
    assert token_budget.prompts_for_step(9_000, before, 1_500, 10, 5, 0, 0, 10.0, 8, 50) == 0  # overspent


# ------------------------------------------------------------------ one definition of the buckets
def test_the_profile_summary_counts_buckets_with_the_routing_bands(tmp_path):
    from stagewise_pl.callbacks.rules import RouteByPassRate
    from stagewise_pl.phases import PhaseContext, ProfileRunner
    from stagewise_pl.routing import RoutingView, route
    from stagewise_pl.routing.selection import Selection

    ledger = hand_ledger(tmp_path / "ledger", {"1-profile": ("profile", 1, {
        "a": [0] * 8, "b": [1] + [0] * 7, "c": [1] * 4 + [0] * 4, "d": [1] * 7 + [0], "e": [1] * 8})})
    rule = RouteByPassRate(hard_max=0.125, easy_min=0.875)
    spec = PhaseSpec(1, "1-profile", "profile")
    view = RoutingView(ledger, {p: Problem(p, p, "1", "t") for p in "abcde"}, [spec], PhaseSpec(2, "2-sft", "sft"))
    buckets = route([rule], view)
    ctx = PhaseContext(load_config("default"), None, None, ledger=ledger, bands=rule.bands)
    summary = ProfileRunner(ctx, spec, Selection("1-profile", "profile", "all", [])).summary()
    counts = {name: len(ids) for name, ids in buckets.items()}
    assert counts == {"hard": 2, "medium": 1, "easy": 2}
    assert {k: summary[k] for k in counts} == counts  # the summary's "hard" is the rule's "hard"
    assert PassRateBands().counts([0.0, 0.125, 0.5, 1.0]) == {"easy": 1, "medium": 2, "hard": 1}


# ------------------------------------------------------------------ configuration from the registries
def test_a_registered_variant_is_an_allowed_value():
    from stagewise_pl.losses import AGGREGATIONS, token_mean_weights

    with pytest.raises(ConfigError, match="'grpo.loss_aggregation': 'per_token' is not registered"):
        load_config("default", ["grpo.loss_aggregation=per_token"])
    AGGREGATIONS.register("per_token")(token_mean_weights)
    try:
        assert load_config("default", ["grpo.loss_aggregation=per_token"]).grpo.loss_aggregation == "per_token"
    finally:
        AGGREGATIONS._items.pop("per_token")


def test_old_paths_and_keys_load_with_a_deprecation_message():
    from stagewise_pl.routing import make_rules

    with pytest.warns(FutureWarning, match="stages.rules is now routing.rules"):
        cfg = load_config("default", ["stages.rules=[{target: callbacks.rules:RouteByPassRate}]"])
    with pytest.warns(FutureWarning, match="installed as stagewise_pl.callbacks"):
        rules = make_rules(cfg.routing.rules)
    assert type(rules[0]).__module__ == "stagewise_pl.callbacks.rules"


# ------------------------------------------------------------------ end to end
def test_a_supervised_kind_registered_outside_the_package_runs_with_epochs_and_replay(tmp_path, fast_overrides):
    from stagewise_pl.run import Run

    run_dir = tmp_path / "plugin"
    plan = ("phases=[{kind: profile, limit: 24}, "
            "{kind: 'phase_plugins:AnswerOnly', select: hard, fallback: medium, epochs: 2, replay: 0.5}]")
    Run(load_config("default", fast_overrides + [f"run.dir={run_dir}", "eval.k=0", "eval.before=false",
                                                 "profile.k=2", plan]), log=lambda *_: None).execute()
    state = json.loads((run_dir / "state.json").read_text())
    summary = state["completed"]["2-answeronly"]
    routing = json.loads((run_dir / "routing" / "02-2-answeronly.json").read_text())
    taught = len(routing["selected"]) - len(routing["replay"])
    assert taught > 0 and len(routing["replay"]) == taught  # replay 0.5: as many replayed as taught
    assert summary["examples"] == len(routing["selected"])
    assert summary["optimizer_steps"] == max(1, round(2 * len(routing["selected"]) / 8))  # 2 epochs, batch 8
    assert (run_dir / "export" / "2-answeronly" / "model.safetensors").is_file()  # trains: exported
    import phase_plugins  # registers "answer_only" by name
    from transformers import AutoTokenizer

    from stagewise_pl.data.sft import IGNORE_INDEX
    from stagewise_pl.phases import PhaseContext
    from stagewise_pl.routing.selection import Selection

    # what it trained on is its own targets: the answer line alone, not data.target
    tok = AutoTokenizer.from_pretrained(run_dir / "export" / "2-answeronly")
    cfg = load_config("default", fast_overrides)
    problem = Problem("q", "2+3", "5", "t", solution="2+3=5 #### 5", teacher_traces=["2+3 is 5 #### 5"])
    runner = phase_plugins.AnswerOnly(PhaseContext(cfg, None, tok), PhaseSpec(2, "2-a", "answer_only", epochs=1.0),
                                      Selection("2-a", "answer_only", "all", [problem]))
    (example,) = runner.examples
    assert tok.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True) == "#### 5"

    assert load_config("default", ["phases=[{kind: answer_only, epochs: 1}]"]).phases[0].kind == "answer_only"


def test_a_run_of_the_former_format_is_refused_with_the_reason(tmp_path, fast_overrides):
    from stagewise_pl.run import Run

    run_dir = tmp_path / "old"
    args = fast_overrides + [f"run.dir={run_dir}", "eval.k=0", "eval.before=false"]
    Run(load_config("default", args), log=lambda *_: None).execute()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["format"] == 2
    del state["format"], state["finished"]  # as the run directory of the version before the phase context
    (run_dir / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="written by an earlier version of stagewise_pl .run format 1"):
        Run(load_config("default", args + ["run.resume=last"]), log=lambda *_: None).execute()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_guard_finds_one_bad_entry_in_any_gradient(dtype):
    """The non-finite guard's gradient check (the gradients' total norm, as guarded_step computes it): one NaN or
    inf entry in any gradient is found; large finite low-precision gradients are not mistaken for overflow;
    parameters without a gradient are skipped."""
    def grads_finite(params):
        return NonFiniteGuard(100, "t").ok(0.0, grad_norm(params), 1)

    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(64, 32), (7,), (3, 5)]]
    assert grads_finite(params)  # no gradients at all
    for p in params[:2]:
        p.grad = torch.full_like(p, 6e4)  # near float16's largest: its norm in float16 would overflow
    assert grads_finite(params)
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[1].grad[3] = bad
        assert not grads_finite(params)
        params[1].grad[3] = 1.0
    assert grads_finite(params)
    mixed = [params[0], torch.nn.Parameter(torch.zeros(4, dtype=torch.float32 if dtype != torch.float32 else
                                                       torch.bfloat16))]
    mixed[1].grad = torch.ones_like(mixed[1])
    assert grads_finite(mixed)  # gradients of several dtypes at once
    mixed[1].grad[0] = float("nan")
    assert not grads_finite(mixed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guarded_step_clips_by_the_total_norm_it_checked_and_skips_a_bad_step(dtype):
    """The gradients' norm is computed once per step: clipping by it scales every gradient by one factor to a
    total norm of grad_clip (0: no clipping); a NaN gradient leaves parameters and optimizer untouched and drops
    the gradients."""
    from stagewise_pl.phases.optim import guarded_step

    class Module:  # what guarded_step reads of a Lightning module
        def __init__(self):
            self.policy = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(dtype)
            self.opt = torch.optim.SGD(self.policy.parameters(), lr=1.0)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)

        def optimizers(self):
            return self.opt

        def lr_schedulers(self):
            return self.sched

    def step_with(grads, clip):
        module = Module()
        before = [p.detach().clone() for p in module.policy.parameters()]
        for p, g in zip(module.policy.parameters(), grads):
            p.grad = g.clone()
        moved = guarded_step(module, NonFiniteGuard(3, "t"), 0.5, 1, clip)
        deltas = [(b - p.detach()).double() for b, p in zip(before, module.policy.parameters())]
        return moved, deltas, module

    torch.manual_seed(0)
    grads = [torch.randn_like(p) * 3 for p in Module().policy.parameters()]
    total = torch.stack([g.double().norm() for g in grads]).norm()
    assert total > 2  # the clip bites
    moved, deltas, module = step_with(grads, 1.0)
    norm = torch.stack([d.norm() for d in deltas]).norm()
    assert moved and abs(norm - 1.0) < 0.02 and module.sched.last_epoch == 1
    ratios = [(d.norm() / g.double().norm()).item() for d, g in zip(deltas, grads)]
    assert max(ratios) - min(ratios) < 0.02  # every gradient scaled by the same factor
    moved, deltas, _ = step_with(grads, 0.0)
    assert moved and abs(torch.stack([d.norm() for d in deltas]).norm() - total) < 0.05 * total
    grads[1][0] = float("nan")
    moved, deltas, module = step_with(grads, 1.0)
    assert not moved and all((d == 0).all() for d in deltas) and module.sched.last_epoch == 1
    assert all(p.grad is None for p in module.policy.parameters())


def test_an_sft_phase_trains_under_bf16_mixed_precision(tmp_path, fast_overrides):
    """trainer.precision=bf16-mixed, which the help offers: autocast forward, float32 weights and gradients through
    the guarded step (one gradient norm, clipping by it); every step is taken and the weights move, finite."""
    from safetensors.torch import load_file

    from stagewise_pl.phases.warmup import tiny_base_model
    from stagewise_pl.run import Run
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    run_dir = tmp_path / "run"
    cfg = load_config("default", fast_overrides + [f"run.dir={run_dir}", "eval.k=0", "eval.before=false",
                                                   "trainer.precision=bf16-mixed", "optim.grad_clip=0.5",
                                                   "phases=[{name: s, kind: sft, steps: 4, lr: 5e-4}]"])
    Run(cfg, log=lambda *_: None).execute()
    done = json.loads((run_dir / "state.json").read_text())["completed"]["s"]
    assert done.get("nonfinite_skipped", 0) == 0 and done["optimizer_steps"] == 4, done
    base = load_file(tiny_base_model(cfg, ArithmeticTask.from_config(cfg.task), log=lambda *_: None) /
                     "model.safetensors")
    trained = load_file(run_dir / "export" / "s" / "model.safetensors")
    assert trained.keys() == base.keys() and all(t.isfinite().all() for t in trained.values())
    assert any(not torch.equal(base[k], trained[k]) for k in base)
