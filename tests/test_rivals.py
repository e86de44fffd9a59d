"""The rivals' kinds: luffy (the teacher's trace as an off-policy group member under policy shaping; its second loss
path against a hand-written float64 loss) and hinted (GRPO with a prefix of the teacher's trace in the prompt: the
hint's lines, its share's adaptation, what the engine sees and what is graded), each in a run: kill and resume, DDP."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import fit, fit_ddp, same_weights
from test_kernels import BACKENDS, FP32_TOL, grads, naive, policy_inputs
from test_mixed import FakeModule, assert_same, expected_delta, make_runner


# ------------------------------------------------------------------ the second loss path
def hand_shaped_loss(logp, old, advantages, mask, off, gamma, eps_low, eps_high):
    """Token mean over every row's tokens; trace rows -A pi/(pi+gamma), the others the clipped surrogate: by loops."""
    total, tokens = 0.0, float(mask.sum())
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            a = advantages[b]
            if off[b]:
                p = torch.exp(logp[b, t])
                term = -a * p / (p + gamma)
            else:
                r = torch.exp(logp[b, t] - old[b, t])
                term = -torch.minimum(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            total = total + term
    return total / tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [None, 13])
def test_the_shaped_loss_path_matches_a_hand_written_float64_loss(backend, block):
    from stagewise_pl.kernels import fused_shaped_policy_loss
    from stagewise_pl.losses import PolicyLossConfig, shaped_policy_loss

    hidden, weight, targets, mask, old, _, advantages = policy_inputs()
    off = torch.tensor([False, True, False])
    cfg = PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.28)
    out = fused_shaped_policy_loss(hidden, weight, targets, old.float(), advantages.float(), mask.float(), off, cfg,
                                   0.1, backend=backend, chunk_tokens=5, vocab_block=block)
    logp = naive(hidden.reshape(-1, hidden.shape[-1]), weight, torch.zeros(weight.shape[0]), targets.reshape(-1),
                 1.0)[0].view(targets.shape)
    by_hand = hand_shaped_loss(logp, old, advantages, mask, off, 0.1, 0.2, 0.28)
    reference = shaped_policy_loss(logp, old, advantages, mask, off, cfg, 0.1)
    assert abs(reference.item() - by_hand.item()) <= 1e-12
    assert abs(out.loss.item() - by_hand.item()) <= FP32_TOL
    for mine, theirs in zip(grads(out.loss, (hidden, weight)), grads(by_hand, (hidden, weight))):
        assert (mine.double() - theirs).abs().max() <= FP32_TOL
    # the trace row is neither clipped nor counted in the clip fraction: its ratio to old is far from 1 here
    on = mask.clone()
    on[1] = 0
    ratio = torch.exp(logp - old)
    active = ((ratio > 1.28) & (advantages[:, None] > 0)) | ((ratio < 0.8) & (advantages[:, None] < 0))
    assert out.clip_fraction.item() == pytest.approx(float((active * on).sum() / on.sum()), abs=1e-6)
    clipped_trace = ((torch.exp(logp[1] - old[1]) - 1).abs() > 0.28) & mask[1].bool()
    assert bool(clipped_trace.any())  # so a clip on the trace row would have changed the loss above


def test_with_no_trace_rows_the_shaped_path_is_the_clipped_surrogate():
    from stagewise_pl.kernels import fused_policy_loss, fused_shaped_policy_loss
    from stagewise_pl.losses import PolicyLossConfig

    hidden, weight, targets, mask, old, ref, advantages = policy_inputs(dtype=torch.float64)
    cfg = PolicyLossConfig(beta=0.04, entropy_coef=0.01)
    a = fused_policy_loss(hidden, weight, targets, old, advantages, mask, cfg, ref_logp=ref, chunk_tokens=4)
    b = fused_shaped_policy_loss(hidden, weight, targets, old, advantages, mask, torch.zeros(3, dtype=torch.bool),
                                 cfg, 0.1, ref_logp=ref, chunk_tokens=4)
    assert a.loss.item() == b.loss.item()
    assert torch.equal(grads(a.loss, (hidden,))[0], grads(b.loss, (hidden,))[0])


def test_the_shaped_path_refuses_bad_flags_and_gamma():
    from stagewise_pl.kernels import fused_shaped_policy_loss
    from stagewise_pl.losses import PolicyLossConfig

    hidden, weight, targets, mask, old, _, advantages = policy_inputs()
    with pytest.raises(ValueError, match="one flag per row"):
        fused_shaped_policy_loss(hidden, weight, targets, old, advantages, mask, torch.zeros(2, dtype=torch.bool),
                                 PolicyLossConfig(), 0.1)
    with pytest.raises(ValueError, match="gamma > 0"):
        fused_shaped_policy_loss(hidden, weight, targets, old, advantages, mask, torch.zeros(3, dtype=torch.bool),
                                 PolicyLossConfig(), 0.0)


# ------------------------------------------------------------------ luffy: the union group
def luffy_groups(tok, problems, correct, g=3):
    """``g`` hand-made on-policy completions per problem; ``correct[i]`` lists which of problem i's are correct."""
    from stagewise_pl.models.load import render_prompt
    from stagewise_pl.phases.sampling import Groups

    texts = ["2", "4 6", "8"][:g]
    prompt_ids = [tok(render_prompt(tok, p.prompt), add_special_tokens=False)["input_ids"] for p in problems]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    reasons = ["correct" if j in correct[i] else "wrong" for i in range(len(problems)) for j in range(g)]
    rewards = torch.tensor([[1.0 if j in correct[i] else 0.0 for j in range(g)] for i in range(len(problems))])
    return Groups(list(problems), prompt_ids, [x for _ in problems for x in ids], [t for _ in problems for t in texts],
                  [False] * (g * len(problems)), rewards, reasons, [0] * len(problems))


def hand_luffy_loss(policy, tok, groups, runner, kept, gamma):
    """The union's loss by hand: advantages over the G rollouts and the trace (mean and std of the G + 1 rewards, as
    grpo's), on-policy tokens -A (ratio 1), trace tokens -A pi/(pi+gamma); one token mean over both."""
    g = groups.group_size
    terms, tokens = [], 0
    for i in kept:
        problem = groups.problems[i]
        trace = runner.traces.get(problem.id)
        members = [(groups.completion_ids[i * g + j], float(groups.rewards[i, j]), False) for j in range(g)]
        if trace is not None:
            ids = tok(trace, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            members.append((ids, 1.0, True))  # the hand-made traces state the right answer
        r = torch.tensor([m[1] for m in members], dtype=torch.float64)
        adv = (r - r.mean()) / (r.std() + 1e-4)
        for (ids, _, off), a in zip(members, adv):
            prompt = groups.prompt_ids[i]
            logits = policy(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].double()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
            if off:
                p = torch.exp(lp)
                terms.append((-a * p / (p + gamma)).sum())
            else:
                terms.append((-a * torch.exp(lp - lp.detach())).sum())
            tokens += len(ids)
    return sum(terms) / tokens


def with_verifier(runner):
    from stagewise_pl.verify import make_verifier

    runner.ctx.verifier = make_verifier(runner.cfg.verifier)
    return runner


def luffy_runner(tiny_model_dir, **mixed):
    runner, policy, tok, problems = make_runner(tiny_model_dir, "luffy", **mixed)
    with_verifier(runner)
    runner.traces = {p.id: f"{p.answer}. The answer is {p.answer}" for p in problems}  # graded correct
    return runner, policy, tok, problems


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_luffy_step_is_the_union_groups_loss_with_the_trace_shaped(tiny_model_dir, gamma):
    runner, policy, tok, problems = luffy_runner(tiny_model_dir, shaping_gamma=gamma)
    assert runner.s.num_generations == 3  # grpo.num_generations=4: three rollouts and the trace
    # p1 all failed (the trace alone is right: signal), p2 mixed, p3 all right and the trace right (flat: dropped),
    # p4 no trace and all failed (flat: dropped)
    runner.traces[problems[3].id] = None
    groups = luffy_groups(tok, problems, [[], [1], [0, 1, 2], []])
    expected = expected_delta(policy, hand_luffy_loss(policy, tok, groups, runner, [0, 1], gamma))
    before = [p.detach().clone() for p in policy.parameters()]
    trained, stats = runner.train_on(FakeModule(policy), groups)
    delta = [p.detach() - b for p, b in zip(policy.parameters(), before)]
    assert trained == 2 and stats["off_policy_rows"] == 2 and stats["trace_reward"] == 1.0
    assert stats["trace_advantage"] > 0 and runner.optimizer_steps == 1
    assert_same(delta, expected)


def test_a_problem_without_a_trace_keeps_its_on_policy_group(tiny_model_dir):
    from stagewise_pl.phases.luffy import union_advantages, union_groups, union_informative

    runner, policy, tok, problems = luffy_runner(tiny_model_dir)
    groups = luffy_groups(tok, problems[:2], [[0], [0]])
    members = {problems[0].id: ([5, 6], 1.0, "correct", False)}  # p2 has none
    union, has = union_groups(groups, members)
    assert union.rewards.shape == (2, 4) and has.tolist() == [True, False]
    assert union.completion_ids[3] == [5, 6] and union.completion_ids[7] == []
    adv = union_advantages(union.rewards, has, "grpo", "default")
    assert adv[1, 3] == 0 and adv[1, :3].sum().abs() < 1e-6 and adv[0].sum().abs() < 1e-6
    assert union_informative(torch.tensor([[0.0, 0, 0, 1], [0, 0, 0, 1]]), torch.tensor([True, False])) == [0]


def test_luffy_refuses_a_group_with_no_room_for_rollouts(tiny_model_dir):
    import dataclasses

    from stagewise_pl.config import ConfigError

    runner, *_ = luffy_runner(tiny_model_dir)
    runner.ctx.cfg = dataclasses.replace(runner.cfg, grpo=dataclasses.replace(runner.cfg.grpo, num_generations=1))
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        type(runner)(runner.ctx, runner.spec, runner.selection)


# ------------------------------------------------------------------ hinted: the hint and its share
def test_a_hint_is_a_share_of_the_working_lines_and_never_the_answer_line():
    from stagewise_pl.phases.hinted import hint_lines

    trace = "1+2=3\n3+4=7\n7-5=2\nThe answer is 2."
    assert hint_lines(trace, 0.0) == ""
    assert hint_lines(trace, 0.5) == "1+2=3\n3+4=7"  # round(1.5) -> 2 of 3
    assert hint_lines(trace, 0.25) == "1+2=3"
    assert hint_lines(trace, 1.0) == "1+2=3\n3+4=7\n7-5=2"
    assert hint_lines("The answer is 2.", 1.0) == ""  # nothing but the answer: no hint


def test_the_share_grows_when_a_group_fails_and_shrinks_when_it_succeeds():
    from stagewise_pl.phases.hinted import next_share

    assert next_share(0.5, 0, 8, 0.25, 0.5) == 0.75  # every rollout failed: a longer hint
    assert next_share(0.5, 2, 8, 0.25, 0.5) == 0.5  # some signal: as it is
    assert next_share(0.5, 4, 8, 0.25, 0.5) == 0.25  # half right: a shorter one
    assert next_share(0.1, 8, 8, 0.25, 0.5) == 0.0 and next_share(0.9, 0, 8, 0.25, 0.5) == 1.0  # within [0, 1]


class ScriptedEngine:
    """Answers every prompt with the completions given, and keeps the prompts it was asked."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.prompts = tok, texts, []

    def generate(self, prompts, sampling, desc=""):
        from stagewise_pl.rollout.base import RolloutBatch

        self.prompts += list(prompts)
        n, out = sampling.n, RolloutBatch(sampling.n, [], [], [], [], [] if sampling.logprobs else None)
        for prompt in prompts:
            out.prompt_ids.append(self.tok(prompt, add_special_tokens=False)["input_ids"])
            for j in range(n):
                ids = self.tok(self.texts[j], add_special_tokens=False)["input_ids"]
                out.completion_ids.append(ids)
                out.texts.append(self.texts[j])
                out.finish_reasons.append("stop")
                if out.logprobs is not None:
                    out.logprobs.append([-1.0] * len(ids))
        return out


@pytest.mark.parametrize("placement", ["assistant", "user"])
def test_hinted_rollouts_see_the_hint_and_are_graded_on_what_the_student_wrote(tiny_model_dir, placement):
    import dataclasses

    from stagewise_pl.models.load import render_prompt
    from stagewise_pl.phases import PHASES

    runner, policy, tok, problems = make_runner(tiny_model_dir, "luffy")  # a context and problems to reuse
    ctx = with_verifier(runner).ctx
    ctx.cfg = dataclasses.replace(ctx.cfg, hint=dataclasses.replace(ctx.cfg.hint, placement=placement))
    runner = PHASES.get("hinted")(ctx, runner.spec, runner.selection)
    runner.traces = {p.id: f"{p.prompt} {p.answer}\nThe answer is {p.answer}" for p in problems}
    p1, p2 = problems[:2]
    runner.traces[p2.id] = None  # no trace: sampled bare
    # the student's completions: the first says the answer of p1 (2); the hint never states it
    runner.engine = ScriptedEngine(tok, ["The answer is 2", "The answer is 5", "7", "The answer is 2"])
    groups = runner.sample_and_grade(policy, [p1, p2], 0)
    hint = f"{p1.prompt} {p1.answer}"
    bare = render_prompt(tok, p1.prompt)
    if placement == "assistant":
        assert runner.engine.prompts[0] == bare + hint + "\n"
    else:
        assert runner.engine.prompts[0] == render_prompt(tok, f"{p1.prompt}\n\nThe start of a solution:\n{hint}")
    assert runner.engine.prompts[1] == render_prompt(tok, p2.prompt)  # no trace, no hint
    assert ctx.renderer(p1.prompt) == bare  # later phases and the evaluation see the bare problem
    assert groups.rewards[0].tolist() == [1.0, 0.0, 0.0, 1.0]  # graded on the student's text alone
    assert groups.reasons[2] == "no_answer"  # "7": the hint's "1 + 1 = 2" was not graded with it
    assert groups.prompt_ids[0] == tok(runner.engine.prompts[0], add_special_tokens=False)["input_ids"]
    assert runner.hinted_rollouts == 4 and runner.bare_rollouts == 4
    # half of p1's group was right: its hint shrinks by one step (0.5 -> 0.25); the update is grpo's on the groups
    runner.train_on(FakeModule(policy), groups)
    assert runner.shares == {p1.id: 0.25} and runner.optimizer_steps == 1
    state = runner.state_dict()
    other = PHASES.get("hinted")(ctx, runner.spec, runner.selection)
    other.load_state_dict(state)
    assert other.shares == runner.shares and other.traces == runner.traces
    assert (other.hinted_rollouts, other.bare_rollouts) == (4, 4)


def test_a_hinted_update_trains_on_the_students_tokens_only(tiny_model_dir):
    """The hint sits in the prompt: the update equals grpo's on the same groups, the loss over the completions."""
    from stagewise_pl.phases import PHASES
    from test_mixed import hand_groups, hand_rl_loss

    runner, policy, tok, problems = make_runner(tiny_model_dir, "luffy")
    runner = PHASES.get("hinted")(runner.ctx, runner.spec, runner.selection)
    groups = hand_groups(tok, problems[:2], [[0], [1, 2]])
    expected = expected_delta(policy, hand_rl_loss(policy, groups, [0, 1]))
    before = [p.detach().clone() for p in policy.parameters()]
    runner.train_on(FakeModule(policy), groups)
    assert_same([p.detach() - b for p, b in zip(policy.parameters(), before)], expected)


# ------------------------------------------------------------------ both in a run: kill and resume, DDP
PLAN = "phases=[{name: l, kind: luffy, steps: 4, lr: 1e-4}, {name: h, kind: hinted, steps: 4, lr: 1e-4}]"
SETTINGS = ["grpo.prompts_per_step=6", "grpo.num_generations=4", "grpo.max_new_tokens=24",
            "trainer.checkpoint_every_n_steps=2", "run.deterministic=true", "eval.each_phase=false",
            "grpo.levels=[4,5,6]"]


@pytest.mark.slow
def test_a_killed_rivals_run_resumes_to_the_uninterrupted_one(tmp_path, base_overrides):
    args = base_overrides + [PLAN] + SETTINGS
    golden = tmp_path / "golden"
    out = fit(args + [f"run.dir={golden}"])
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads((golden / "state.json").read_text())["completed"]
    lf, h = done["l"], done["h"]
    assert lf["kind"] == "luffy" and lf["teacher_traces"] > 0 and lf["off_policy_rows"] > 0
    assert lf["optimizer_steps"] == 4 and lf["teacher_texts"] == lf["teacher_traces"]
    assert h["kind"] == "hinted" and h["teacher_traces"] > 0 and h["hinted_rollouts"] > 0
    for name, phase in (("l", lf), ("h", h)):  # killed in each phase after a checkpoint, mid-phase
        crashed = tmp_path / f"crashed-{name}"
        assert fit(args + [f"run.dir={crashed}"], {"STAGEWISE_FAULT": f"step:{name}:3"}).returncode == -9
        runner = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PhaseManager"]
        assert runner["runner"]["position"] == 2 and runner["runner"]["traces"]
        out = fit(args + [f"run.dir={crashed}", "resume=last"])
        assert out.returncode == 0, out.stderr[-3000:]
        assert same_weights(golden / "final", crashed / "final")
        again = json.loads((crashed / "state.json").read_text())["completed"]
        strip = lambda s: {k: v for k, v in s.items() if not k.startswith("seconds")}  # noqa: E731
        assert strip(again[name]) == strip(phase)


@pytest.mark.slow
def test_two_ddp_processes_run_the_rivals_kinds_to_the_same_weights(tmp_path, base_overrides):
    """luffy and hinted under DDP: traces asked on rank 0 and broadcast, the union's rows sharded across the ranks;
    both ranks end with the same weights (fit_ddp checks), and the ledger holds every on-policy rollout once."""
    from stagewise_pl.ledger import DifficultyLedger

    run_dir = tmp_path / "ddp"
    fit_ddp(base_overrides + [PLAN] + SETTINGS, run_dir)
    done = json.loads((run_dir / "state.json").read_text())["completed"]
    assert done["l"]["off_policy_rows"] > 0 and done["l"]["optimizer_steps"] == 4
    assert done["h"]["hinted_rollouts"] > 0 and done["h"]["optimizer_steps"] == 4
    table = DifficultyLedger(run_dir / "ledger", "x").table().to_pylist()
    for name in ("l", "h"):
        keys = [(r["step"], r["problem_id"], r["sample_index"]) for r in table if r["phase"] == name]
        assert len(keys) == done[name]["rollouts"] and len(set(keys)) == len(keys)
    assert max(r["sample_index"] for r in table if r["phase"] == "l") == 2  # three rollouts a group, no trace row
