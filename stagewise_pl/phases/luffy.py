"""The ``luffy`` kind: the teacher's trace as an off-policy member of every GRPO group (LUFFY, arXiv 2504.14945).

A reconstruction from the paper (docs/PEERS.md says what differs). Each rollout step samples
``grpo.num_generations - 1`` completions of each prompt from the student (the group's on-policy members), grades them,
records them in the ledger, and adds the configured teacher's trace of the problem as the group's last member, graded
by the same verifier. Advantages are computed over the union (``grpo.advantage``), so a group whose rollouts all fail
but whose trace is right has signal. The loss is :func:`~stagewise_pl.kernels.fused_shaped_policy_loss`: on-policy
tokens the clipped surrogate, the trace's tokens ``-A f(pi)`` with ``f(pi) = pi / (pi + mixed.shaping_gamma)``,
unclipped (policy shaping: it keeps low-probability teacher tokens learnable instead of letting the policy collapse on
the tokens it already likes). One token mean over both kinds of tokens (``grpo.loss_aggregation``).

Traces are asked of the teacher once per problem (MixedRunner's cache, in the checkpoint) and counted in
``teacher_traces``; a problem with no trace keeps a group of its on-policy rollouts only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from stagewise_pl.advantages import compute_advantages
from stagewise_pl.config import ConfigError
from stagewise_pl.kernels import fused_shaped_policy_loss
from stagewise_pl.phases.base import PHASES
from stagewise_pl.phases.mixed import MixedRunner
from stagewise_pl.phases.sampling import Groups, informative


def union_groups(groups: Groups, traces: dict[str, tuple[list[int], float, str, bool]]) -> tuple[Groups, torch.Tensor]:
    """``groups`` (P, G) with each problem's trace appended as member G: (the (P, G+1) groups, which problems have a
    trace). ``traces``: problem id -> (completion ids, reward, reason, truncated). A problem without a trace gets an
    empty member G (no tokens, reward 0) that :func:`union_advantages` leaves out."""
    g = groups.group_size
    completion_ids, texts, truncated, reasons, logprobs, rewards = [], [], [], [], [], []
    has = torch.tensor([p.id in traces for p in groups.problems], dtype=torch.bool)
    for i, problem in enumerate(groups.problems):
        rows = range(i * g, (i + 1) * g)
        ids, reward, reason, cut = traces.get(problem.id, ([], 0.0, "no_trace", False))
        completion_ids += [groups.completion_ids[r] for r in rows] + [list(ids)]
        texts += [groups.texts[r] for r in rows] + [""]
        truncated += [groups.truncated[r] for r in rows] + [cut]
        reasons += [groups.reasons[r] for r in rows] + [reason]
        if groups.logprobs is not None:  # the trace was not sampled by the engine: no engine log-probs
            logprobs += [groups.logprobs[r] for r in rows] + [[]]
        rewards.append(torch.cat([groups.rewards[i], torch.tensor([reward], dtype=groups.rewards.dtype)]))
    union = Groups(list(groups.problems), list(groups.prompt_ids), completion_ids, texts, truncated,
                   torch.stack(rewards) if rewards else groups.rewards.new_zeros((0, g + 1)), reasons,
                   list(groups.rounds), groups.seconds_generation, groups.seconds_grading, groups.nonfinite,
                   logprobs if groups.logprobs is not None else None)
    return union, has


def union_advantages(rewards: torch.Tensor, has_trace: torch.Tensor, advantage: str, std_scale: str) -> torch.Tensor:
    """Advantages of (P, G+1) union groups: over all G+1 members where the problem has a trace, over the G on-policy
    members (the trace's 0) where it has none."""
    out = torch.zeros_like(rewards)
    if bool(has_trace.any()):
        out[has_trace] = compute_advantages(rewards[has_trace], advantage, std_scale)
    if bool((~has_trace).any()):
        out[~has_trace, :-1] = compute_advantages(rewards[~has_trace, :-1], advantage, std_scale)
    return out


def union_informative(rewards: torch.Tensor, has_trace: torch.Tensor) -> list[int]:
    """Union groups whose members' rewards are not all equal (a missing trace is no member)."""
    with_trace, without = set(informative(rewards)), set(informative(rewards[:, :-1]))
    return [i for i in range(rewards.shape[0]) if i in (with_trace if bool(has_trace[i]) else without)]


@PHASES.register("luffy")
class LUFFYRunner(MixedRunner):
    """GRPO groups of G-1 rollouts and the teacher's trace, the trace's tokens under policy shaping."""

    kind = "luffy"

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        if self.s.num_generations < 2:
            raise ConfigError(f"phase {spec.name} (luffy): a group is grpo.num_generations - 1 rollouts and one "
                              f"trace; grpo.num_generations must be at least 2 (got {self.s.num_generations})")
        if self.m.shaping_gamma <= 0:
            raise ConfigError(f"phase {spec.name} (luffy): mixed.shaping_gamma must be > 0 (got "
                              f"{self.m.shaping_gamma})")
        self.s.num_generations -= 1  # the on-policy members; the trace is the group's last
        self._rows: dict[str, tuple[list[int], float, str, bool]] = {}  # problem id -> its trace as a member
        self._off: Optional[torch.Tensor] = None  # the update's rows that are traces
        self.off_policy_rows = 0  # trace members trained on (rows with an advantage), over the phase

    def trace_members(self, problems: list) -> dict[str, tuple[list[int], float, str, bool]]:
        """Problem id -> (completion ids, reward, reason, truncated) of its trace as a group member, for those of
        ``problems`` with a trace: tokenized as an SFT target is (EOS appended), cut at ``grpo.max_new_tokens`` as a
        rollout is, graded by the verifier. Computed once per problem (a pure function of the trace)."""
        have = self.traces_for(problems)
        new = [p for p in {p.id: p for p in problems}.values() if p.id in have and p.id not in self._rows]
        if new:
            tok = self.ctx.tokenizer
            verdicts = self.ctx.verifier.score_batch([have[p.id] for p in new], [p.answer for p in new])
            for p, v in zip(new, verdicts):
                ids = tok(have[p.id], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                cut = len(ids) > self.s.max_new_tokens
                reward = float(v.reward)
                reward = reward if math.isfinite(reward) else 0.0  # as sample_and_grade counts a NaN/inf
                self._rows[p.id] = (ids[:self.s.max_new_tokens], reward, v.reason, cut)
        return {pid: self._rows[pid] for pid in {p.id for p in problems} if pid in self._rows}

    def train_on(self, module, groups: Groups) -> tuple[int, Optional[dict]]:
        s = self.s
        union, has = union_groups(groups, self.trace_members(groups.problems))
        keep = union_informative(union.rewards, has) if s.drop_flat_groups else list(range(len(union.problems)))
        if not keep:
            return 0, None
        selected, has = union.select(keep), has[keep]
        advantages = union_advantages(selected.rewards, has, s.advantage, s.std_scale)
        g = selected.group_size
        self._off = (torch.arange(len(selected.completion_ids)) % g == g - 1)
        stats = self.update(module, selected, advantages)
        trained = int(has.sum())
        self.off_policy_rows += trained
        trace_rewards = selected.rewards[has, -1]
        stats.update(off_policy_rows=float(trained),
                     trace_reward=float(trace_rewards.mean()) if trained else 0.0,
                     trace_advantage=float(advantages[has, -1].mean()) if trained else 0.0)
        return len(keep), stats

    # ------------------------------------------------------------------ the second loss path
    def row_loss(self, rows, hidden, head, targets, old, advantages, mask, ref, weights, ent_weights, rollout_logp):
        s = self.s
        return fused_shaped_policy_loss(
            hidden, head.weight, targets, old, advantages, mask, self._off.to(rows.device)[rows], s.loss,
            self.m.shaping_gamma, ref_logp=ref, bias=getattr(head, "bias", None), temperature=s.temperature,
            with_entropy=True, weights=weights, entropy_weight=ent_weights, backend=self.cfg.trainer.kernel,
            rollout_logp=rollout_logp, tis_cap=s.tis_cap)

    def sampled_mask(self, rows, mask: torch.Tensor) -> torch.Tensor:
        return mask * (~self._off.to(rows.device)[rows]).to(mask.dtype).unsqueeze(-1)  # not the traces

    # ------------------------------------------------------------------ checkpoints and summaries
    def state_dict(self) -> dict:
        return dict(super().state_dict(), off_policy_rows=self.off_policy_rows)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.off_policy_rows = int(state["off_policy_rows"])

    def summary(self) -> dict:
        out = super().summary()
        if self.problems:
            out.update(off_policy_rows=self.off_policy_rows, shaping_gamma=self.m.shaping_gamma,
                       on_policy_per_group=self.s.num_generations)
            out.pop("sft_examples", None)
            out.pop("switch_gate", None)
        return out
