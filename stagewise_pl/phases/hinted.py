"""The ``hinted`` kind: GRPO on problems the student cannot solve, with a prefix of the teacher's trace in the prompt.

A reconstruction of hinted RL (PrefixRL arXiv 2601.18795, QuestA, Scaf-GRPO; docs/PEERS.md says what differs), the
rival of Bridge SFT for the hard bucket: rather than imitating the teacher's trace, the student is given its start
and learns by RL to finish it. Usable in place of ``bridge_sft`` in any plan (``select: hard``).

- A problem's hint is the first ``share`` of its trace's working lines (every line but the last, the answer line, so
  the hint never states the answer): ``round(share x working lines)`` of them. The first time a problem is sampled
  its share is ``hint.initial_share``; after each of its groups the share moves by ``hint.step``: up when every
  rollout failed (the group had no signal), down when at least ``hint.lower_at`` of them were correct (the student
  needs less), within [0, 1]. A share of 0 is the bare problem.
- ``hint.placement``: ``assistant`` puts the hint at the start of the student's answer (the rendered prompt, then the
  hint's lines; the student goes on from there, PrefixRL's off-policy prefix); ``user`` adds it to the problem
  (``hint.user_template``, QuestA's partial solution in the question).
- The student's own tokens are the completion: the hint is part of the prompt, so the loss is on the student's
  tokens only, and the verifier grades what the student wrote (the answer line is never in the hint).
- Everything else is grpo's (sampling, advantages, the clipped surrogate, the ledger, the token budget). The held-out
  evaluation and every later phase see the bare problem: only this phase's engine calls carry hints.

Traces are asked once per problem (MixedRunner's cache, in the checkpoint, counted in ``teacher_traces``); the shares
are in the checkpoint too, so a resumed phase gives the same hints. A problem without a trace is sampled bare.
"""
from __future__ import annotations

from typing import Optional

from stagewise_pl.phases.base import PHASES
from stagewise_pl.phases.mixed import MixedRunner
from stagewise_pl.phases.sampling import Groups


def hint_lines(trace: str, share: float) -> str:
    """The first ``round(share x W)`` of the trace's W working lines (all but the last line), joined; '' for none."""
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    working = lines[:-1]
    count = min(len(working), int(share * len(working) + 0.5))
    return "\n".join(working[:count])


def next_share(share: float, correct: int, group_size: int, step: float, lower_at: float) -> float:
    """A problem's hint share after one of its groups: longer when none of the ``group_size`` rollouts was correct,
    shorter when at least ``lower_at`` of them were, unchanged otherwise; within [0, 1]."""
    if correct == 0:
        share += step
    elif correct >= lower_at * group_size:
        share -= step
    return round(min(1.0, max(0.0, share)), 6)


@PHASES.register("hinted")
class HintedRunner(MixedRunner):
    """GRPO with adaptive hints from the teacher's traces (see the module's docstring)."""

    kind = "hinted"

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        self.h = self.cfg.hint
        self.shares: dict[str, float] = {}  # problem id -> its hint's share now
        self._hints: dict[str, str] = {}  # prompt -> its hint in the current rollout step's engine call
        self.hinted_rollouts = self.bare_rollouts = 0
        base = ctx.renderer

        def render(prompt: str) -> str:
            hint = self._hints.get(prompt, "")
            if not hint:
                return base(prompt)
            if self.h.placement == "user":
                return base(self.h.user_template.format(prompt=prompt, hint=hint))
            return base(prompt) + hint + "\n"

        self.render = render  # this phase's engine calls only; ctx.renderer stays the bare one

    def hints_for(self, problems: list) -> dict[str, str]:
        """Prompt -> hint of each of ``problems`` at its current share (asking the teacher for new problems)."""
        have = self.traces_for(problems)
        out = {}
        for p in problems:
            if p.id in have:
                share = self.shares.setdefault(p.id, float(self.h.initial_share))
                out[p.prompt] = hint_lines(have[p.id], share)
        return out

    def sample_and_grade(self, policy, problems: list, round_: int) -> Groups:
        self._hints = self.hints_for(problems)  # every rank: traces are asked on rank 0 and broadcast
        try:
            groups = super().sample_and_grade(policy, problems, round_)
        finally:
            hinted = {p for p, h in self._hints.items() if h}
            self._hints = {}
        g = groups.group_size
        count = sum(g for p in groups.problems if p.prompt in hinted)
        self.hinted_rollouts += count
        self.bare_rollouts += g * len(groups.problems) - count
        return groups

    def train_on(self, module, groups: Groups) -> tuple[int, Optional[dict]]:
        shares = [self.shares.get(p.id, 0.0) for p in groups.problems]  # the shares these groups were sampled at
        g = groups.group_size
        for i, p in enumerate(groups.problems):  # the hints of the next groups, from this one's outcome
            if p.id in self.shares:
                correct = sum(groups.reasons[i * g + j] == "correct" for j in range(g))
                self.shares[p.id] = next_share(self.shares[p.id], correct, g, self.h.step, self.h.lower_at)
        trained, stats = super().train_on(module, groups)  # grpo's update on the graded groups
        if stats is not None and shares:
            stats.update(hint_share=sum(shares) / len(shares))
        return trained, stats

    # ------------------------------------------------------------------ checkpoints and summaries
    def state_dict(self) -> dict:
        return dict(super().state_dict(), shares=dict(self.shares), hinted_rollouts=self.hinted_rollouts,
                    bare_rollouts=self.bare_rollouts)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.shares = {k: float(v) for k, v in state["shares"].items()}
        self.hinted_rollouts, self.bare_rollouts = int(state["hinted_rollouts"]), int(state["bare_rollouts"])

    def brief_parts(self, summary: dict) -> list[str]:
        parts = super().brief_parts(summary)
        if summary.get("hinted_rollouts") is not None:
            parts.append(f"{summary['hinted_rollouts']} of {summary['hinted_rollouts'] + summary['bare_rollouts']} "
                         f"rollouts hinted")
        return parts

    def summary(self) -> dict:
        out = super().summary()
        if self.problems:
            shares = list(self.shares.values())
            out.update(hinted_rollouts=self.hinted_rollouts, bare_rollouts=self.bare_rollouts,
                       hint_share_end=round(sum(shares) / len(shares), 4) if shares else None,
                       bare_at_end=sum(s == 0.0 for s in shares), placement=self.h.placement)
            for key in ("sft_examples", "switch_gate"):
                out.pop(key, None)
        return out
