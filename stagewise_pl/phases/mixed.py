"""Peers of the method that decide per problem, inside one RL phase, between RL and imitation of a teacher trace.

Both kinds are reconstructions from the papers and their code (docs/PEERS.md says what differs from the published
settings), with their choices in the ``mixed`` config group. They sample, grade, record and update exactly as the
``grpo`` kind does (the ``grpo`` group, :class:`~stagewise_pl.phases.grpo.GRPORunner`); what differs is what a
step trains on. A group with at most ``mixed.switch_gate`` correct rollouts (default 0: every rollout failed)
carries no RL signal; these kinds teach its problem the configured teacher's trace instead:

- ``hpt`` (HPT, arXiv 2509.04419, "switch" strategy): in the same step. The step's one loss is
  ``L = L_RL(the other groups) + mixed.sft_weight * L_SFT(the traces)``, one optimizer step; the failed group's
  rollouts get no RL loss.
- ``relift`` (ReLIFT, arXiv 2506.07527): later. The problem and its trace go into a buffer; each time the buffer
  holds ``mixed.buffer_size`` of them, one SFT optimizer step on the whole buffer, which is then emptied. The
  buffer is part of the checkpoint, so a resumed phase ends with the same weights.

``L_SFT`` is the token-mean NLL of the trace tokens (the completion only). Traces are asked of the teacher once per
problem and kept for the phase (in the checkpoint); with ``mixed.bridge`` they first go through the configured
Bridge strategy (the student's rewrite tokens count as generated tokens). A problem the teacher has no trace for
(or whose bridged trace is dropped) gets neither loss. Every rollout is recorded in the ledger as in ``grpo``.
"""
from __future__ import annotations

from typing import Optional

from stagewise_pl import dist
from stagewise_pl.advantages import compute_advantages
from stagewise_pl.config import ConfigError
from stagewise_pl.losses import IGNORE_INDEX
from stagewise_pl.phases.base import PHASES
from stagewise_pl.phases.grpo import GRPORunner
from stagewise_pl.phases.grpo_batch import my_micro_slices
from stagewise_pl.phases.sampling import Groups, informative
from stagewise_pl.plan import PhaseTraits


def imitation_groups(groups: Groups, gate: int) -> list[int]:
    """Indices of the groups with at most ``gate`` correct rollouts: the ones taught by a trace instead of RL."""
    g = groups.rewards.shape[1]
    return [i for i in range(len(groups.problems))
            if sum(groups.reasons[i * g + j] == "correct" for j in range(g)) <= gate]


class MixedRunner(GRPORunner):
    """GRPO plus teacher traces for the groups RL cannot learn from (see the module's docstring)."""

    traits = PhaseTraits(trains=True, generates=True, records_rollouts=True, token_budgeted=True, uses_teacher=True,
                         step_unit="update")

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        if self.s.num_iterations != 1 or self.s.minibatches != 1:  # hpt mixes both losses in one step; relift's
            # steps count one optimizer step per update
            raise ConfigError(f"phase {spec.name} ({self.kind}): one optimizer step per update; set "
                              f"grpo.num_iterations=1 and grpo.minibatches=1 (got {self.s.num_iterations}, "
                              f"{self.s.minibatches})")
        self.m = self.cfg.mixed
        self.traces: dict[str, Optional[str]] = {}  # problem id -> its trace (None: the teacher gave none)
        self.teacher_traces = 0  # traces the teacher gave (asked once per problem)
        self.sft_examples = 0  # trace uses in an SFT loss
        self.bridge_tokens = 0  # what the student generated in Bridge rewrites

    # ------------------------------------------------------------------ the traces
    def traces_for(self, problems: list) -> dict[str, str]:
        """Problem id -> trace for those of ``problems`` that have one, asking the teacher (rank 0) only for the
        problems not asked yet."""
        new = list({p.id: p for p in problems if p.id not in self.traces}.values())
        if new:
            got = self.ask(new) if dist.is_main() else None
            got, asked, tokens = dist.broadcast(got)
            self.traces.update(got)
            self.teacher_traces += asked
            self.bridge_tokens += tokens
        return {p.id: self.traces[p.id] for p in problems if self.traces.get(p.id)}

    def ask(self, problems: list) -> tuple[dict[str, Optional[str]], int, int]:
        """(id -> trace or None, traces the teacher gave, tokens the student generated bridging them)."""
        if self.m.bridge:
            from stagewise_pl.bridge import make_strategy, run_bridge

            bridge = self.bridge_context(salt=self.position)
            items, _ = run_bridge(make_strategy(self.cfg.bridge), bridge, problems)
            out: dict[str, Optional[str]] = {p.id: None for p in problems}
            out.update({it.problem_id: it.target for it in items})
            return out, bridge.teacher_texts, bridge.generated_tokens
        from stagewise_pl.teachers.base import TeacherError, TeacherUnavailable

        try:
            traces = self.ctx.teachers.teacher().traces(problems, n=1)
        except TeacherUnavailable:
            raise  # an endpoint that answers nothing stops the run (exit 7): training on without it would be silent
        except TeacherError as exc:
            self.ctx.log(f"phase {self.spec.name}: the teacher gave no traces for {len(problems)} problems ({exc})")
            traces = [[] for _ in problems]
        out = {p.id: (t[0] if t else None) for p, t in zip(problems, traces)}
        return out, sum(v is not None for v in out.values()), 0

    # ------------------------------------------------------------------ the SFT term
    def sft_backward(self, module, pairs: list[tuple[str, str]], weight: float) -> tuple[float, float]:
        """Backward of ``weight`` x the token-mean NLL of the (prompt, trace) pairs, over every rank's share
        (micro-batches of ``grpo.micro_batch_size``); returns (weighted loss, plain NLL)."""
        from stagewise_pl.data.examples import encode_pairs
        from stagewise_pl.data.sft import Collator
        from stagewise_pl.models.forward import sft_loss

        examples = encode_pairs(self.ctx.tokenizer, pairs, self.cfg.trainer.max_length, self.ctx.renderer)
        total = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples)  # every rank's trace tokens
        collate = Collator(self.ctx.tokenizer.pad_token_id, self.cfg.trainer.max_length, False)
        nll = 0.0
        # every rank the same number of backward passes (as the grpo update does): None = an empty one
        for part in my_micro_slices(len(examples), self.s.micro_batch_size):
            if part is None:
                module.manual_backward(sum(p.sum() for p in module.policy.parameters()) * 0.0)
                continue
            batch = {k: v.to(module.device) for k, v in collate(examples[part]).items()}
            loss, count = sft_loss(module.policy, batch, self.cfg.trainer.kernel)
            share = loss * (count / max(1, total))  # this micro-batch's part of the token mean
            module.manual_backward(share * weight * dist.world_size())
            nll += float(share.detach())
        if dist.world_size() > 1:
            nll = sum(dist.gather(nll))
        self.sft_examples += len(examples)
        return weight * nll, nll

    # ------------------------------------------------------------------ checkpoints and summaries
    def state_dict(self) -> dict:
        return dict(super().state_dict(), traces=self.traces, teacher_traces=self.teacher_traces,
                    sft_examples=self.sft_examples, bridge_tokens=self.bridge_tokens)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.traces = dict(state.get("traces", {}))
        self.teacher_traces, self.sft_examples = int(state["teacher_traces"]), int(state["sft_examples"])
        self.bridge_tokens = int(state.get("bridge_tokens", 0))

    def summary(self) -> dict:
        out = super().summary()
        if self.problems:
            out["generated_tokens"] += self.bridge_tokens
            out.update(teacher_traces=self.teacher_traces, teacher_texts=self.teacher_traces,
                       sft_examples=self.sft_examples, switch_gate=self.m.switch_gate, bridged=self.m.bridge)
        return out

    def spent_now(self) -> int:
        return super().spent_now() + self.bridge_tokens


@PHASES.register("hpt")
class HPTRunner(MixedRunner):
    """HPT-style switching: each failed group's problem is learned from its trace in the same optimizer step as
    the RL loss of the other groups."""

    kind = "hpt"

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        self._pairs: list[tuple[str, str]] = []  # this step's (prompt, trace) pairs, read by extra_backward
        self._sft: dict = {}

    def train_on(self, module, groups: Groups) -> tuple[int, Optional[dict]]:
        s = self.s
        failed = imitation_groups(groups, self.m.switch_gate)
        have = self.traces_for([groups.problems[i] for i in failed])
        taught = [i for i in failed if groups.problems[i].id in have]
        self._pairs = [(groups.problems[i].prompt, have[groups.problems[i].id]) for i in taught]
        self._sft = {}
        skip = set(failed)
        rl = [i for i in (informative(groups.rewards) if s.drop_flat_groups else range(len(groups.problems)))
              if i not in skip]
        if rl:
            selected = groups.select(rl)
            stats = self.update(module, selected, compute_advantages(selected.rewards, s.advantage, s.std_scale))
        elif self._pairs:
            self.optimizer_step(module, self.extra_backward(module))
            stats = {"loss": 0.0, "lr": float(module.lr_schedulers().get_last_lr()[0])}
        else:
            return 0, None
        stats.update(self._sft, rl_groups=float(len(rl)), sft_groups=float(len(taught)))
        return len(rl) + len(taught), stats

    def extra_backward(self, module) -> float:
        if not self._pairs:
            return 0.0
        weighted, nll = self.sft_backward(module, self._pairs, self.m.sft_weight)
        self._sft = {"sft_loss": nll}
        return weighted


@PHASES.register("relift")
class ReLIFTRunner(MixedRunner):
    """ReLIFT-style interleaving: RL as in grpo; failed problems and their traces fill a buffer, and each full
    buffer is one SFT optimizer step. The phase's ``steps`` count its updates of either kind (RL updates and SFT
    steps), so it takes as many optimizer steps as a grpo phase of the same steps; the schedule runs over both."""

    kind = "relift"

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        self.buffer: list[tuple[str, str]] = []  # (problem id, trace) waiting for the next SFT step
        self.prompts = {p.id: p.prompt for p in self.problems}  # a buffered problem's prompt, by id
        self.sft_steps = self.rl_updates = 0

    def updates_done(self) -> int:
        return self.rl_updates + self.sft_steps

    def train_on(self, module, groups: Groups) -> tuple[int, Optional[dict]]:
        failed = imitation_groups(groups, self.m.switch_gate)
        have = self.traces_for([groups.problems[i] for i in failed])
        trained, stats = super().train_on(module, groups)  # RL on the groups with signal, as grpo
        self.rl_updates += stats is not None
        if self.updates_done() >= self.spec.steps:  # the RL update was the phase's last
            return trained, stats
        for i in failed:
            pid = groups.problems[i].id
            if pid in have:
                self.buffer.append((pid, have[pid]))
        if len(self.buffer) < self.m.buffer_size:
            return trained, stats
        loss, nll = self.sft_backward(module, [(self.prompts[pid], trace) for pid, trace in self.buffer], 1.0)
        self.optimizer_step(module, loss)
        self.sft_steps += 1
        stats = dict(stats or {"loss": 0.0, "lr": float(module.lr_schedulers().get_last_lr()[0])},
                     sft_loss=nll, sft_buffer=float(len(self.buffer)))
        self.buffer = []
        return trained, stats

    def state_dict(self) -> dict:
        return dict(super().state_dict(), buffer=[list(x) for x in self.buffer], sft_steps=self.sft_steps,
                    rl_updates=self.rl_updates)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer = [tuple(x) for x in state["buffer"]]
        self.sft_steps, self.rl_updates = int(state["sft_steps"]), int(state["rl_updates"])

    def brief_parts(self, summary: dict) -> list[str]:
        split = [f"{summary['sft_steps']} SFT + {summary['rl_updates']} RL"] if "sft_steps" in summary else []
        return split + super().brief_parts(summary)

    def summary(self) -> dict:
        out = super().summary()
        if self.problems:
            out.update(sft_steps=self.sft_steps, rl_updates=self.rl_updates, buffer_size=self.m.buffer_size,
                       buffer_left=len(self.buffer))
        return out
