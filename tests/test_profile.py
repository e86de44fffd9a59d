"""Cheaper profiles (issue [Profile]): sequential sampling decided by the routing rules' own cells, evidence reused
under the same policy, buckets carried forward and confirmed, profiles of one bucket. The mechanics run on a stand-in
engine whose problems are always, never or half the time solved; runs of the real tiny model check the ledger,
resume and DDP."""
from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import fit, fit_ddp, hand_ledger, same_weights
from stagewise_pl.callbacks.promote import PromoteAboveThreshold
from stagewise_pl.callbacks.rules import NeverSolvedInRL, RouteByPassRate
from stagewise_pl.config import load_config
from stagewise_pl.data.problems import Problem
from stagewise_pl.ledger import DifficultyLedger
from stagewise_pl.phases.base import kind_traits
from stagewise_pl.phases.context import PhaseContext
from stagewise_pl.phases.profile import ProfileRunner
from stagewise_pl.plan import PhaseSpec
from stagewise_pl.rollout.base import RolloutBatch
from stagewise_pl.routing import RoutingRule
from stagewise_pl.routing.evidence import Tally, add, carried_outcome, decided, rate_key, wanted
from stagewise_pl.routing.selection import Selection
from stagewise_pl.verify.exact import ExactVerifier

K = 8


# ---------------------------------------------------------------------------------------------- the decision rule
def bucket_key(*rules):
    key, why = rate_key(list(rules))
    assert key is not None, why
    return key


def test_a_success_and_a_failure_decide_medium_at_once_and_the_extremes_need_all_k():
    key = bucket_key(RouteByPassRate())
    assert decided(1, 2, K, key)  # 0 < p < 1 whatever comes next
    assert not decided(0, 2, K, key) and not decided(2, 2, K, key)
    assert not decided(0, 7, K, key) and decided(0, 8, K, key) and decided(8, 8, K, key)
    assert not decided(0, 0, K, key)


def test_the_cells_are_read_from_the_rules_not_spelled_again():
    wide = bucket_key(RouteByPassRate(hard_max=0.25, easy_min=0.75))  # hard: at most 2 of 8, easy: at least 6
    assert not decided(1, 2, K, wide)  # 1 of 2 could still end hard (1/8) or easy (7/8)
    assert not decided(0, 5, K, wide) and decided(0, 6, K, wide)  # 0 of 6: at most 2/8 at the end: hard
    assert decided(3, 4, K, wide) is False and decided(3, 5, K, wide) is False
    assert decided(5, 6, K, wide) is False and decided(6, 6, K, wide)  # 6 of 6: at least 6/8: easy
    both = bucket_key(RouteByPassRate(), PromoteAboveThreshold(0.5))  # the promotion threshold is a cell too
    assert decided(1, 2, K, bucket_key(RouteByPassRate())) and not decided(1, 2, K, both)
    assert not decided(1, 5, K, both) and decided(1, 6, K, both)  # 1 of 6: at most 3/8 < 0.5 at the end


def test_a_rule_that_reads_profiles_without_saying_how_makes_profiles_take_all_k():
    class Opaque(RoutingRule):
        reads = "profile"

    key, why = rate_key([RouteByPassRate(), NeverSolvedInRL(), Opaque()])
    assert key is None and "Opaque" in why
    assert rate_key([RouteByPassRate(), NeverSolvedInRL()])[0] is not None  # a rule reading grpo phases: no cells
    assert wanted(Tally(), K, 1, 2, None) == K  # no cells: all k at once


@pytest.mark.parametrize("rules", [(RouteByPassRate(),), (RouteByPassRate(0.25, 0.75),),
                                   (RouteByPassRate(), PromoteAboveThreshold(0.25))])
def test_stopping_early_never_changes_the_cell_of_the_same_samples(rules):
    """Every sequence of k outcomes: the cell the routing reads after stopping (correct / drawn) is the cell of
    all k -- a sequential profile is a full profile cut short where the rest cannot matter."""
    key = bucket_key(*rules)
    for outcomes in itertools.product([False, True], repeat=K):
        t = Tally()
        while (n := wanted(t, K, 1, 2, key)) > 0:
            add(t, outcomes[t.n:t.n + n])
        assert t.n <= K and key(t.rate) == key(sum(outcomes) / K), outcomes


def test_a_carried_outcome_stands_on_agreeing_samples_and_falls_on_one_that_disagrees():
    assert carried_outcome([(8, 8)], (0, 0)) == 1 and carried_outcome([(0, 8), (0, 9)], (0, 3)) == 0
    assert carried_outcome([(8, 8), (7, 8)], (0, 0)) is None  # not all-correct two profiles ago
    assert carried_outcome([(8, 8)], (3, 4)) is None  # failed since (a GRPO rollout)
    assert carried_outcome([(0, 8)], (1, 4)) is None and carried_outcome([None], (0, 0)) is None
    t = Tally(8, 8, source="p1", carried=1)
    assert wanted(t, K, 1, 2, None) == 1
    add(t, [True])
    assert (t.correct, t.n, t.fresh, wanted(t, K, 1, 2, None)) == (9, 9, 1, 0)
    t = Tally(8, 8, source="p1", carried=1)
    add(t, [False])  # contradicted: only the fresh sample counts now, profiled as any other problem
    assert (t.carried, t.correct, t.n, t.source) == (None, 0, 1, "")
    assert wanted(t, K, 1, 2, bucket_key(RouteByPassRate())) == 2


# ---------------------------------------------------------------------------------------------- a stand-in engine
class StandIn:
    """Answers problem ``always-*`` right, ``never-*`` wrong, ``coin-*`` right with probability 1/2 (seeded by the
    call's seed); ``flip`` turns named problems the other way. Counts the samples it draws."""

    def __init__(self):
        self.flip, self.calls = set(), []

    def with_current_weights(self):
        return self

    def generate(self, prompts, sampling, desc=""):
        rng = np.random.default_rng(sampling.seed)
        texts = []
        for prompt in prompts:
            pid = prompt.split("|")[0]
            for _ in range(sampling.n):
                right = pid.startswith("always") or (pid.startswith("coin") and rng.random() < 0.5)
                texts.append(f"#### {'7' if right != (pid in self.flip) else '8'}")
        self.calls.append((len(prompts), sampling.n))
        return RolloutBatch(sampling.n, [[1]] * len(prompts), [[1, 2, 3]] * len(texts), texts,
                            ["stop"] * len(texts))


POOL = [Problem(f"{kind}-{i}", f"{kind}-{i}|question", "7", "stand-in", level="1")
        for kind in ("always", "never", "coin") for i in range(6)]


def profiles(tmp_path, overrides, plan, decisions=None):
    cfg = load_config("default", ["profile.chunk=5", *overrides])
    engine = StandIn()
    ctx = PhaseContext(cfg, None, SimpleNamespace(), plan=plan, traits=kind_traits(), pool=POOL,
                       verifier=ExactVerifier(), engines=engine, ledger=DifficultyLedger(tmp_path / "ledger", "t"),
                       rate_key=rate_key([RouteByPassRate()])[0], decisions=dict(decisions or {}))
    return ctx, engine


def run_profile(ctx, spec, problems=POOL, global_step=0):
    runner = ProfileRunner(ctx, spec, Selection(spec.name, "profile", spec.select, list(problems)))
    module = SimpleNamespace(global_step=global_step)
    for step in range(runner.total_steps()):
        runner.step(module, step)
    ctx.decisions[spec.name] = {"selected": [p.id for p in problems], **runner.record()}
    return runner


def rows_of(ctx, phase):
    return [r for r in ctx.ledger.table().to_pylist() if r["phase"] == phase]


P1, SFT, P2 = PhaseSpec(1, "p1", "profile"), PhaseSpec(2, "s", "sft", select="coin"), PhaseSpec(3, "p2", "profile")


def test_a_full_profile_samples_every_problem_k_times(tmp_path):
    ctx, engine = profiles(tmp_path, ["profile.sequential=false"], [P1])
    runner = run_profile(ctx, P1)
    assert len(rows_of(ctx, "p1")) == len(POOL) * K and {e["how"] for e in runner.evidence.values()} == {"sampled"}
    assert all(n == K for _, n in engine.calls)  # one call of n=k per chunk, as before there were rounds
    summary = runner.summary()
    assert (summary["easy"], summary["hard"], summary["medium"]) == (6, 6, 6) and summary["rollouts"] == 18 * K


def test_a_sequential_profile_stops_each_problem_once_its_bucket_is_decided(tmp_path):
    ctx, _ = profiles(tmp_path, ["profile.sequential=true", "profile.round=2"], [P1])
    runner = run_profile(ctx, P1)
    rows = rows_of(ctx, "p1")
    by = {pid: [r for r in rows if r["problem_id"] == pid] for pid in runner.evidence}
    for pid, e in runner.evidence.items():
        assert e["fresh"] == e["n"] == len(by[pid]) and e["c"] == sum(r["reason"] == "correct" for r in by[pid])
        assert sorted(r["sample_index"] for r in by[pid]) == list(range(e["n"]))  # indices run on across rounds
        if not pid.startswith("coin"):
            assert e["n"] == K and e["how"] == "sampled"  # easy and hard need all k
        else:  # medium once a success and a failure are seen (or hard/easy after k alike)
            outcomes = [r["reason"] == "correct" for r in sorted(by[pid], key=lambda r: r["sample_index"])]
            assert e["n"] == K or (any(outcomes) and not all(outcomes))
    assert any(e["how"] == "early" for e in runner.evidence.values())
    assert len(rows) < len(POOL) * K and runner.summary()["decided_by"]["early"] >= 1
    assert {r["round"] for r in rows} == {0, 1, 2, 3}  # rounds of 2 up to k = 8 for the extremes


def test_carried_buckets_are_confirmed_with_one_sample_and_trained_or_changed_problems_are_profiled_anew(tmp_path):
    overrides = ["profile.sequential=true", "profile.carry=1", "profile.confirm=1"]
    ctx, engine = profiles(tmp_path, overrides, [P1, SFT, P2])
    run_profile(ctx, P1)
    ctx.decisions["s"] = {"selected": ["always-0", "never-1", "coin-0"], "replay": ["always-0"]}  # trains never-1
    engine.flip = {"always-5"}  # it fails now
    runner = run_profile(ctx, P2)
    ev = runner.evidence
    assert ev["always-1"] == {"c": 9, "n": 9, "fresh": 1, "how": "carried", "from": "p1"}
    assert ev["never-2"] == {"c": 0, "n": 9, "fresh": 1, "how": "carried", "from": "p1"}
    assert ev["always-0"]["how"] == "carried"  # replayed, not chosen: carried
    assert ev["never-1"]["fresh"] == K and ev["never-1"]["how"] == "sampled"  # trained since: profiled anew
    assert ev["always-5"] == {"c": 0, "n": K, "fresh": K, "how": "sampled"}  # the confirmation failed
    assert all(ev[f"coin-{i}"]["how"] in ("sampled", "early") for i in range(6))  # not all alike in p1
    assert len(rows_of(ctx, "p2")) == sum(e["fresh"] for e in ev.values())
    summary = runner.summary()
    assert summary["decided_by"]["carried"] == 10 and summary["hard"] == 7 and summary["easy"] == 5


def test_rollouts_after_the_last_profile_that_disagree_stop_a_carry(tmp_path):
    ctx, _ = profiles(tmp_path, ["profile.carry=1", "profile.carry_trained=true"], [P1, SFT, P2])
    run_profile(ctx, P1)
    hand = hand_ledger(tmp_path / "ledger", {"g": ("grpo", 2, {"always-3": [1, 0], "never-3": [0, 0]})})
    ctx.ledger = hand
    ctx.decisions["s"] = {"selected": ["always-3"]}
    ev = run_profile(ctx, P2).evidence
    assert ev["always-3"]["how"] == "sampled" and ev["always-3"]["fresh"] == K  # failed once in the GRPO phase
    assert ev["never-3"] == {"c": 0, "n": 11, "fresh": 1, "how": "carried", "from": "p1"}  # 8 + 2 since + 1


def test_rollouts_under_the_same_policy_are_reused_and_a_later_policy_samples_anew(tmp_path):
    ctx, engine = profiles(tmp_path, ["profile.reuse=true", "profile.sequential=true"], [P1, P2])
    run_profile(ctx, P1, global_step=5)
    p1 = json.dumps(ctx.decisions["p1"]["evidence"], sort_keys=True)
    drawn = len(engine.calls)
    runner = run_profile(ctx, P2, global_step=5)  # no optimizer step between: p1's samples are this policy's
    assert len(engine.calls) == drawn and not rows_of(ctx, "p2")
    assert all(e["how"] == "reused" and e["from"] == "p1" and e["fresh"] == 0 for e in runner.evidence.values())
    assert {k: (e["c"], e["n"]) for k, e in runner.evidence.items()} == \
        {k: (e["c"], e["n"]) for k, e in json.loads(p1).items()}
    assert runner.summary()["generated_tokens"] == 0
    later = run_profile(ctx, PhaseSpec(4, "p3", "profile"), global_step=6)
    assert all(e["how"] in ("sampled", "early") for e in later.evidence.values()) and rows_of(ctx, "p3")


def test_the_report_counts_a_profiles_buckets_from_its_evidence_also_where_it_drew_nothing(tmp_path):
    from stagewise_pl.report import ledger_stats

    ctx, _ = profiles(tmp_path, ["profile.reuse=true", "profile.sequential=false"], [P1, P2])
    run_profile(ctx, P1)
    run_profile(ctx, P2)  # every sample reused: no rows of its own
    (tmp_path / "routing").mkdir()
    for number, name in ((1, "p1"), (3, "p2")):
        (tmp_path / "routing" / f"{number:02d}-{name}.json").write_text(json.dumps(
            {"phase": name, "kind": "profile", **ctx.decisions[name]}))
    stats = ledger_stats(tmp_path, {"p1": {"kind": "profile"}, "p2": {"kind": "profile"}})
    assert stats["buckets"]["p2"] == stats["buckets"]["p1"] == {"easy": 6, "medium": 6, "hard": 6}
    assert [f["problems"] for f in stats["flows"]] == [18]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_grpo_phases_groups_count_when_sampled_alike_under_the_same_policy(tmp_path, top_p):
    g, p2 = PhaseSpec(1, "g", "grpo"), PhaseSpec(2, "p2", "profile")
    ctx, _ = profiles(tmp_path, ["profile.reuse=true", f"grpo.top_p={top_p}"], [g, p2])
    ctx.ledger = hand_ledger(tmp_path / "ledger", {"g": ("grpo", 1, {"always-0": [1] * 8, "coin-0": [1, 0]})})
    ev = run_profile(ctx, p2, global_step=0).evidence  # the hand-made rows were graded at optimizer step 0
    if top_p == 1.0:
        assert ev["always-0"] == {"c": 8, "n": 8, "fresh": 0, "how": "reused", "from": "g"}
        assert ev["coin-0"] == {"c": 1, "n": 2, "fresh": 0, "how": "reused", "from": "g"}  # medium already
    else:  # nucleus sampling is another distribution: not evidence of this profile's
        assert ev["always-0"]["fresh"] == K and ev["coin-0"]["how"] in ("sampled", "early")
    assert ev["never-0"]["fresh"] == K


def test_a_profile_of_one_bucket_keeps_the_latest_evidence_on_the_rest(tmp_path):
    ctx, _ = profiles(tmp_path, ["profile.sequential=false"], [P1, PhaseSpec(2, "p2", "profile", select="hard")])
    run_profile(ctx, P1)
    hard = [p for p in POOL if p.id.startswith("never")]
    runner = run_profile(ctx, PhaseSpec(2, "p2", "profile", select="hard"), hard)
    ev = runner.all_evidence()
    assert set(ev) == {p.id for p in POOL} and {r["problem_id"] for r in rows_of(ctx, "p2")} == {p.id for p in hard}
    assert ev["always-0"] == {"c": K, "n": K, "fresh": 0, "how": "kept", "from": "p1"}
    assert runner.summary()["decided_by"] == {"sampled": 6, "kept": 12}


# ---------------------------------------------------------------------------------------------- runs of the tiny model
RUN_PLAN = ("phases=[{name: p1, kind: profile}, {name: s, kind: sft, select: hard, steps: 2, lr: 5e-4}, "
            "{name: p2, kind: profile}, {name: g, kind: grpo, select: medium, steps: 2, lr: 1e-4}, "
            "{name: p3, kind: profile}]")
CHEAP = [RUN_PLAN, "profile.limit=40", "profile.chunk=10", "profile.sequential=true", "profile.reuse=true",
         "profile.carry=1", "trainer.batch_size=16", "grpo.prompts_per_step=4", "grpo.num_generations=4",
         "grpo.max_new_tokens=24", "trainer.checkpoint_every_n_steps=1", "run.deterministic=true",
         "eval.each_phase=false"]


def evidence_of(run_dir, number, name):
    return json.loads((run_dir / "routing" / f"{number:02d}-{name}.json").read_text())["evidence"]


def check_cheap_run(run_dir):
    """A run of CHEAP routes by its profiles' evidence and records every sample once."""
    rows = DifficultyLedger(run_dir / "ledger", "x").table().to_pylist()
    done = json.loads((run_dir / "state.json").read_text())["completed"]
    for number, name in ((1, "p1"), (3, "p2"), (5, "p3")):
        evidence = evidence_of(run_dir, number, name)
        mine = [r for r in rows if r["phase"] == name]
        assert len(evidence) == 40 and len(mine) == sum(e["fresh"] for e in evidence.values()) == done[name]["rollouts"]
        assert len({(r["problem_id"], r["sample_index"]) for r in mine}) == len(mine)
        assert done[name]["rollouts"] < 40 * 8  # medium problems stopped early, carried ones confirmed once
    assert done["p1"]["decided_by"].get("early", 0) > 0 and done["p2"]["decided_by"].get("carried", 0) > 0
    # the SFT phase trained on the hard bucket of p1's evidence, the GRPO phase on p2's medium one
    hard = sorted(pid for pid, e in evidence_of(run_dir, 1, "p1").items() if e["c"] == 0)
    assert json.loads((run_dir / "routing" / "02-s.json").read_text())["selected"] == hard
    medium = sorted(pid for pid, e in evidence_of(run_dir, 3, "p2").items() if 0 < e["c"] < e["n"])
    assert sorted(json.loads((run_dir / "routing" / "04-g.json").read_text())["ids"]["medium"]) == medium
    # carried problems were not trained on since the last profile and had every sample agree
    for pid, e in evidence_of(run_dir, 3, "p2").items():
        if e["how"] == "carried":
            assert pid not in hard and e["c"] in (0, e["n"]) and e["fresh"] == 1


@pytest.mark.slow
def test_a_run_with_cheap_profiles_routes_by_their_evidence_and_a_kill_inside_one_resumes_to_the_same_run(
        tmp_path, base_overrides):
    args = base_overrides + CHEAP
    golden, crashed = tmp_path / "golden", tmp_path / "crashed"
    out = fit(args + [f"run.dir={golden}"])
    assert out.returncode == 0, out.stderr[-3000:]
    check_cheap_run(golden)
    assert fit(args + [f"run.dir={crashed}"], {"STAGEWISE_FAULT": "step:p2:3"}).returncode == -9
    out = fit(args + [f"run.dir={crashed}", "resume=last"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert same_weights(golden / "final", crashed / "final")
    strip = lambda r: {k: v for k, v in r.items() if k != "run_id"}  # noqa: E731
    table = lambda d: [strip(r) for r in DifficultyLedger(d / "ledger", "x").table().to_pylist()]  # noqa: E731
    assert table(golden) == table(crashed)  # the ledger, bit for bit: every sample once, in the same order
    for number, name in ((1, "p1"), (3, "p2"), (5, "p3")):
        assert evidence_of(golden, number, name) == evidence_of(crashed, number, name)


@pytest.mark.slow
def test_two_ddp_processes_profile_sequentially_with_one_ledger_and_one_routing(tmp_path, base_overrides):
    run_dir = tmp_path / "ddp"
    fit_ddp(base_overrides + CHEAP, run_dir)  # the same routing and weights on both ranks
    rows = DifficultyLedger(run_dir / "ledger", "x").table().to_pylist()
    for number, name in ((1, "p1"), (3, "p2"), (5, "p3")):
        evidence = evidence_of(run_dir, number, name)
        mine = [(r["problem_id"], r["sample_index"]) for r in rows if r["phase"] == name]
        assert len(evidence) == 40 and len(mine) == len(set(mine)) == sum(e["fresh"] for e in evidence.values())


@pytest.mark.slow
def test_the_profile_benchmark_compares_every_variant_on_the_same_policies_and_problems(tmp_path, base_overrides):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    plan = ("phases=[{name: p1, kind: profile}, {name: s, kind: sft, select: hard, steps: 2, lr: 5e-4}, "
            "{name: p2, kind: profile}]")
    out = subprocess.run([sys.executable, str(root / "tools" / "bench_profile.py"), "--dir", str(tmp_path / "b"),
                          "--json", str(tmp_path / "b.json"), "--carry-trained", plan, "profile.limit=24",
                          "eval.before=false", "eval.k=0", "trainer.batch_size=16"],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "b.json").read_text())
    assert [p["profile"] for p in figures["profiles"]] == ["p1", "p2"]
    for row in figures["profiles"]:
        assert row["problems"] == 24 and row["full"]["rollouts"] == 24 * 8 and row["full"]["agreement"] == 1.0
        assert row["sequential"]["rollouts"] <= 24 * 8 and row["sequential + evidence"]["rollouts"] <= 24 * 8
        assert sum(map(sum, (r.values() for r in row["full again"]["confusion"].values()))) == 24
    p2 = figures["profiles"][1]["sequential + evidence"]
    assert p2["decided_by"].get("carried", 0) > 0  # the second profile carried buckets from the first
    assert 0 < figures["token_ratio"] < 1 and 0 <= figures["agreement"] <= 1
    assert figures["totals"]["sequential + evidence"]["tokens"] == sum(
        r["sequential + evidence"]["tokens"] for r in figures["profiles"])
    assert "| full again |" in out.stdout and "confusion of `sequential + evidence`" in out.stdout
