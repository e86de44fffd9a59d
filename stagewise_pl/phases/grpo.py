"""The ``grpo`` phase: sample a group of completions per prompt, grade them, update with the clipped surrogate.

One rollout step of the phase:

1. the step's prompts get ``num_generations`` completions each from the rollout engine, and the verifier grades
   them (several ranks: each samples and grades its share, then every rank holds all groups);
2. with dynamic sampling (DAPO), fresh prompts are drawn and sampled until the batch holds ``prompts_per_step``
   informative groups (rewards not all equal), at most ``max_extra_rounds`` more rounds;
3. every graded completion goes to the difficulty ledger (rank 0 writes);
4. advantages per group (:mod:`stagewise_pl.advantages`); groups with no signal are left out when
   ``drop_flat_groups``;
5. ``num_iterations`` passes over the kept completions, each split into ``minibatches`` optimizer steps, each
   mini-batch into micro-batches whose gradients accumulate. The loss is
   :func:`stagewise_pl.kernels.fused_policy_loss` on the decoder's hidden states (no logits tensor); the
   aggregation weights are computed over the whole mini-batch, so micro-batches do not change the gradient.
   With one pass and one mini-batch the update is on-policy (old log-probs = current ones, no extra forward);
   otherwise the old log-probs are computed once, before the first update. With ``beta > 0`` a frozen copy of
   the policy taken at the start of the phase gives reference log-probs for the k3 KL term.

The phase ends after ``steps`` updates, ``steps x grpo.max_rollout_factor`` rollout steps, or once the run's
``budget.generated_tokens`` is spent (each rollout step draws as many prompts as keeps the run on it:
:mod:`stagewise_pl.phases.token_budget`). Loss and gradient equal TRL's for grpo, dr_grpo, dapo, bnpo (TRL crosscheck).
"""
from __future__ import annotations

import copy
import time
from typing import Optional

import numpy as np
import torch

from stagewise_pl import dist
from stagewise_pl.advantages import compute_advantages, group_stats
from stagewise_pl.faults import poisoned
from stagewise_pl.kernels import fused_policy_loss
from stagewise_pl.losses import aggregation_weights, entropy_weights, k3_kl, rollout_mismatch
from stagewise_pl.models.packed import ForwardSettings, completion_hidden, completion_logprobs
from stagewise_pl.nonfinite import NonFiniteGuard
from stagewise_pl.phases import token_budget
from stagewise_pl.phases.base import PHASES, PhaseRunner
from stagewise_pl.phases.grpo_batch import (GRPOSettings, batch_tensors, my_micro_slices, old_logprobs,
                                            rows_with_gradient)
from stagewise_pl.phases.sampling import Groups, informative, sample_and_grade
from stagewise_pl.phases.optim import adamw_with_schedule, guarded_step, warmup_steps_for
from stagewise_pl.plan import PhaseTraits


@PHASES.register("grpo")
class GRPORunner(PhaseRunner):
    """GRPO on the selected problems; every graded rollout goes to the ledger."""

    kind = "grpo"
    traits = PhaseTraits(trains=True, generates=True, records_rollouts=True, token_budgeted=True,
                         step_unit="update")
    sampling_group = "grpo"

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        from stagewise_pl.data.sft import StepBatchSampler

        cfg, g = self.cfg, self.cfg.grpo
        s = self.s = GRPOSettings.from_config(g, ctx.max_new_tokens(g.max_new_tokens))
        if spec.batch_size:
            s.prompts_per_step = spec.batch_size
        if spec.temperature:
            s.temperature = spec.temperature
        self.lr = cfg.optim.lr if spec.lr is None else spec.lr
        self.seed = cfg.run.seed + 1000 * spec.number
        self.max_rollout_steps = spec.steps * g.max_rollout_factor if self.problems else 0  # empty: nothing to do
        self.engine = ctx.engine_with_current_weights()
        self.render = ctx.renderer  # how a problem's prompt is shown to the engine (a kind may add to it)
        self.update_steps = self.optimizer_steps = 0  # rollout steps that made an update; optimizer steps
        self.history: list[dict] = []  # per rollout step metrics (the curves)
        self.guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps, spec.name)
        self.nonfinite_rewards = 0  # rewards a verifier gave as NaN/inf, counted as 0
        self.before: Optional[token_budget.SpentBefore] = None  # grpo.token_budget: what earlier phases spent
        self.budget_spent = False  # budget.generated_tokens: nothing left, the phase ended before its steps
        # updates made / the update the rollout engine's weights are from (the phase starts in sync: the context
        # pushes the policy when it hands out the engine)
        self._weights_version = self._engine_version = 0
        self._frozen: dict = {}  # the KL reference: a plain dict, so it is no submodule (not trained, not saved twice)
        # the global batch of prompts of each rollout step; split across ranks when sampled
        self.sampler = StepBatchSampler(max(1, len(self.problems)), s.prompts_per_step, self.max_rollout_steps,
                                        self.seed)

    @classmethod
    def selection_limits(cls, cfg):
        return cfg.grpo.levels, 0

    # ------------------------------------------------------------------ the phase's course
    def total_steps(self) -> int:
        return self.max_rollout_steps

    def done(self) -> bool:
        return self.updates_done() >= self.spec.steps or self.position >= self.max_rollout_steps or self.budget_spent

    def updates_done(self) -> int:
        """What the phase's ``steps`` count, done so far: rollout steps that made an update."""
        return self.update_steps

    @property
    def reference(self):
        return self._frozen.get("reference")

    def configure_optimizers(self, module):
        per_step = self.s.updates_per_step  # the schedule counts optimizer steps
        o = self.cfg.optim
        return adamw_with_schedule(module.policy, self.lr, o.betas, o.weight_decay,
                                   warmup_steps_for(o, self.spec.steps) * per_step, self.spec.steps * per_step,
                                   o.min_lr_ratio)

    def start(self, module, resumed: bool) -> None:
        module.policy.train()
        if self.s.loss.beta > 0 and self.reference is None:  # the policy as the phase starts
            self._frozen["reference"] = copy.deepcopy(module.policy).eval().requires_grad_(False)
        # records written after the checkpoint we resumed from are about to be made again
        if dist.is_main():
            self.ctx.ledger.rewind(self.spec.name, self.position)
        dist.barrier()
        if self.position:  # resumed: the checkpoint's weights came after the engine got its copy
            self._engine_version = -1

    def step(self, module, step: int) -> None:
        if self.cfg.budget.generated_tokens:
            count = dist.broadcast(self.prompts_within_token_budget() if dist.is_main() else None)
            if count == 0:  # the run's budget is spent: no more rollouts
                self.budget_spent = True
                return
            # seeded by phase and step; past the phase's problem count a problem gets a second group (more samples
            # of it), so a small bucket can still take its share of the budget
            rng, batch = np.random.default_rng([self.seed, step, 11]), []
            while len(batch) < count:
                batch += rng.permutation(len(self.problems))[:count - len(batch)].tolist()
        else:
            batch = self.sampler.batch(step)
        self.rollout_step(module, [self.problems[i] for i in batch])

    # ------------------------------------------------------------------ one rollout step
    def rollout_step(self, module, problems: list) -> None:
        s = self.s
        started = time.perf_counter()
        groups = self.sample_and_grade(module.policy, problems, 0)
        parts, rounds = [groups], 1
        if s.dynamic_sampling:
            kept = len(informative(groups.rewards))
            while kept < s.prompts_per_step and rounds <= s.max_extra_rounds:
                extra = self.sample_and_grade(module.policy, self.extra_problems(rounds, s.prompts_per_step), rounds)
                parts.append(extra)
                kept += len(informative(extra.rewards))
                rounds += 1
        gen_s, grade_s = sum(p.seconds_generation for p in parts), sum(p.seconds_grading for p in parts)
        all_groups = Groups.concat(parts)
        if dist.is_main():  # every rank holds all groups; one writes them
            self.ctx.ledger.record(all_groups.records(self.spec, self.kind, self.position, module.global_step))
        rewards = all_groups.rewards
        t0 = time.perf_counter()
        trained, stats = self.train_on(module, all_groups)
        train_s = time.perf_counter() - t0
        if stats is not None:
            self.update_steps += 1
        self.position += 1
        lengths = torch.tensor([len(c) for c in all_groups.completion_ids], dtype=torch.float32)
        metrics = {
            "reward": float(rewards.mean()),
            "pass_rate": sum(r == "correct" for r in all_groups.reasons) / max(1, len(all_groups.reasons)),
            **group_stats(rewards), "informative_groups": float(len(informative(rewards))),
            "nonfinite_skipped": float(self.guard.skipped),
            "nonfinite_rewards": float(self.nonfinite_rewards + getattr(self.ctx.verifier, "nonfinite", 0)),
            "groups_trained": float(trained), "rounds": float(rounds), "completion_len": float(lengths.mean()),
            "prompts": float(len(problems)), "rollouts": float(len(lengths)), "generated_tokens": float(lengths.sum()),
            "truncated": sum(all_groups.truncated) / max(1, len(all_groups.truncated)),
            "s_generation": gen_s, "s_grading": grade_s, "s_training": train_s,
            "s_step": time.perf_counter() - started, "updated": float(stats is not None), **(stats or {}),
        }
        self.history.append(metrics)
        # every metric of every rollout step straight to the loggers, in one call
        prefix = f"{self.spec.name}/train/"
        module.log_row({**{prefix + name: float(value) for name, value in metrics.items()},
                        prefix + "rollout_step": float(self.position)})
        module.bar(prefix + "reward", metrics["reward"])

    def train_on(self, module, groups: Groups) -> tuple[int, Optional[dict]]:
        """One rollout step's update on its graded groups: (groups trained on, its metrics), or (0, None)."""
        s = self.s
        keep = informative(groups.rewards) if s.drop_flat_groups else list(range(len(groups.problems)))
        if s.dynamic_sampling:
            keep = keep[:s.prompts_per_step]
        if not keep:
            return 0, None
        selected = groups.select(keep)
        return len(keep), self.update(module, selected, compute_advantages(selected.rewards, s.advantage,
                                                                           s.std_scale))

    def sample_and_grade(self, policy, problems: list, round_: int) -> Groups:
        """Sample and grade ``problems`` (:func:`~stagewise_pl.phases.sampling.sample_and_grade`): this rank's share
        of them, then every rank holds all groups (their wall times: this rank's)."""
        from stagewise_pl.rollout.base import SamplingParams

        s = self.s
        mine = dist.shard(problems) if dist.world_size() > 1 else problems
        groups = None
        if mine:
            seed = int(np.random.default_rng([self.seed, self.position, round_]).integers(2**31 - 1))
            # the engine's log-probs of the sampled tokens: the train/rollout mismatch, and TIS
            sampling = SamplingParams(n=s.num_generations, temperature=s.temperature, top_p=s.top_p,
                                      max_new_tokens=s.max_new_tokens, seed=seed, logprobs=True)
            if hasattr(self.engine, "sync_weights") and self._engine_version != self._weights_version:
                self.engine.sync_weights(policy)  # an engine with its own copy samples from the updated policy
                self._engine_version = self._weights_version
            groups = sample_and_grade(self.engine, self.ctx.verifier, self.render, mine, sampling, round_,
                                      desc=f"{self.spec.name} rollouts")
            self.nonfinite_rewards += groups.nonfinite
        if dist.world_size() == 1:
            return groups
        every = Groups.concat([g for g in dist.gather(groups) if g is not None])
        every.seconds_generation = groups.seconds_generation if groups is not None else 0.0
        every.seconds_grading = groups.seconds_grading if groups is not None else 0.0
        return every

    def extra_problems(self, round_: int, count: int) -> list:
        """Fresh prompts for dynamic sampling: a seeded draw, a pure function of (seed, step, round)."""
        rng = np.random.default_rng([self.seed, self.position, round_, 7])
        return [self.problems[i] for i in rng.choice(len(self.problems), size=min(count, len(self.problems)),
                                                     replace=False)]

    # ------------------------------------------------------------------ the update
    def update(self, module, groups: Groups, advantages: torch.Tensor) -> dict[str, float]:
        s, policy, device = self.s, module.policy, module.device
        pad = self.ctx.tokenizer.pad_token_id
        t = batch_tensors(groups, advantages, pad, s.mask_truncated, device)
        n = t.targets.shape[0]
        head = policy.get_output_embeddings()
        fwd = ForwardSettings(pad, s.micro_batch_size, s.shared_prefix, s.temperature, self.cfg.trainer.kernel)
        old = old_logprobs(policy, t, fwd, s)
        ref = completion_logprobs(self.reference.to(device), t, fwd) if s.loss.beta > 0 else None
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.position, 99]).integers(2**31)))
        sums, count = {"loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "kl": 0.0}, 0
        mismatch = {"kl": 0.0, "max_gap": 0.0, "tokens": 0.0}  # the engine's log-probs against the training model's
        rollout_logp = t.rollout_logp
        for iteration in range(s.num_iterations):
            order = torch.randperm(n, generator=gen) if s.minibatches > 1 else torch.arange(n)
            for mb in torch.tensor_split(order.to(device), s.minibatches):
                if len(mb) == 0:
                    continue
                weights = aggregation_weights(t.mask[mb], s.loss)  # over the whole mini-batch
                ent_weights = entropy_weights(t.mask[mb])
                mb, weights, ent_weights = rows_with_gradient(mb, t.advantages, weights, ent_weights, s)
                tokens = t.mask[mb].sum().clamp(min=1)  # the metrics are over the rows trained on
                poison = poisoned(f"nan_loss:{self.spec.name}:{self.update_steps + 1}")  # n-th step that trains
                mb_loss = 0.0
                for part in my_micro_slices(len(mb), s.micro_batch_size):
                    if part is None:
                        module.manual_backward(sum(p.sum() for p in policy.parameters()) * 0.0)
                        continue
                    rows = mb[part]
                    out = self.row_loss(
                        rows, completion_hidden(policy, t, rows, pad, s.shared_prefix), head, t.targets[rows],
                        None if old is None else old[rows], t.advantages[rows], t.mask[rows],
                        None if ref is None else ref[rows], weights[part], ent_weights[part],
                        None if rollout_logp is None else rollout_logp[rows])
                    if rollout_logp is not None and iteration == 0:  # the sampling policy's log-probs: old, or now
                        gap = rollout_mismatch(out.logp if old is None else old[rows], rollout_logp[rows],
                                               self.sampled_mask(rows, t.mask[rows]))
                        mismatch["kl"] += gap["kl"] * gap["tokens"]
                        mismatch["max_gap"] = max(mismatch["max_gap"], gap["max_gap"])
                        mismatch["tokens"] += gap["tokens"]
                    loss = out.loss * float("nan") if poison else out.loss
                    # several ranks: each holds a part of the mini-batch's loss, and DDP averages the gradients
                    module.manual_backward(loss * dist.world_size())
                    value = float(loss.detach())  # one device sync for the guard and the metric
                    mb_loss += value
                    m = t.mask[rows]
                    sums["loss"] += value
                    sums["clip_fraction"] += float(out.clip_fraction * m.sum() / tokens)
                    sums["entropy"] += float((out.entropy * m).sum() / tokens)
                    if ref is not None:
                        sums["kl"] += float((k3_kl(out.logp, ref[rows]) * m).sum().detach() / tokens)
                mb_loss += self.extra_backward(module)
                count += self.optimizer_step(module, mb_loss)
        if dist.world_size() > 1:
            sums = {k: sum(d[k] for d in dist.gather(sums)) for k in sums}
            every = dist.gather(mismatch)
            mismatch = {"kl": sum(d["kl"] for d in every), "max_gap": max(d["max_gap"] for d in every),
                        "tokens": sum(d["tokens"] for d in every)}
        stats = {k: v / max(1, count) for k, v in sums.items()}
        if ref is None:
            stats.pop("kl")
        if mismatch["tokens"]:  # over the tokens of the rows trained on (none: not measured, no 0 in the mean)
            stats["rollout_kl"] = mismatch["kl"] / max(1.0, mismatch["tokens"])
            stats["rollout_max_gap"] = mismatch["max_gap"]
        stats["lr"] = float(module.lr_schedulers().get_last_lr()[0])
        stats["advantage_abs"] = float(advantages.abs().mean())
        return stats

    def row_loss(self, rows, hidden, head, targets, old, advantages, mask, ref, weights, ent_weights, rollout_logp):
        """The policy loss of the batch's ``rows`` (a micro-batch) from their hidden states: the clipped surrogate
        (:func:`~stagewise_pl.kernels.fused_policy_loss`); a kind with another loss path overrides it."""
        s = self.s
        return fused_policy_loss(hidden, head.weight, targets, old, advantages, mask, s.loss, ref_logp=ref,
                                 bias=getattr(head, "bias", None), temperature=s.temperature, with_entropy=True,
                                 weights=weights, entropy_weight=ent_weights, backend=self.cfg.trainer.kernel,
                                 rollout_logp=rollout_logp, tis_cap=s.tis_cap)

    def sampled_mask(self, rows, mask: torch.Tensor) -> torch.Tensor:
        """The tokens of ``rows`` the rollout engine sampled (where the train/rollout mismatch is measured): all."""
        return mask

    def optimizer_step(self, module, loss: float) -> bool:
        """The guarded optimizer step after the gradients of ``loss`` accumulated; True if the weights moved."""
        moved = guarded_step(module, self.guard, loss, self.position + 1, self.cfg.optim.grad_clip)
        self._weights_version, self.optimizer_steps = self._weights_version + moved, self.optimizer_steps + moved
        return moved

    def extra_backward(self, module) -> float:
        """Gradients a kind adds to each mini-batch before its optimizer step (their loss); grpo adds none."""
        return 0.0

    # ------------------------------------------------------------------ the run's budget of generated tokens
    def prompts_within_token_budget(self) -> int:
        """Prompts for this rollout step under ``budget.generated_tokens`` (rank 0; see :mod:`token_budget`)."""
        g, b, ctx = self.cfg.grpo, self.cfg.budget, self.ctx
        if self.before is None:  # what earlier phases spent: fixed once the phase runs
            self.before = token_budget.spent_before(ctx.completed(), ctx.plan, self.spec, ctx.traits,
                                                    ctx.max_new_tokens(g.max_new_tokens) / 2)
        done = [h for h in self.history if h.get("rollouts")]
        per_sample = (sum(h["generated_tokens"] for h in done) / sum(h["rollouts"] for h in done)) if done else \
            self.before.per_sample
        return token_budget.prompts_for_step(
            b.generated_tokens, self.before, self.spent_now(),
            self.spec.steps - self.updates_done(), token_budget.budgeted_steps_after(ctx.plan, self.spec, ctx.traits),
            self.position, self.updates_done(), per_sample, self.s.num_generations, b.max_prompts_per_step)

    def spent_now(self) -> int:
        """Tokens the student generated in this phase so far."""
        return int(sum(h.get("generated_tokens", 0) for h in self.history))

    # ------------------------------------------------------------------ checkpoints and summaries
    def state_dict(self) -> dict:
        state = {"position": self.position, "update_steps": self.update_steps,
                 "optimizer_steps": self.optimizer_steps, "nonfinite": self.guard.state_dict(),
                 "nonfinite_rewards": self.nonfinite_rewards, "history": self.history,
                 "budget_spent": self.budget_spent}
        if self.reference is not None:
            state["reference"] = self.reference.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position, self.update_steps = int(state["position"]), int(state["update_steps"])
        self.optimizer_steps, self.nonfinite_rewards = int(state["optimizer_steps"]), int(state["nonfinite_rewards"])
        self.guard.load_state_dict(state.get("nonfinite", {}))
        self.history = list(state.get("history", []))
        self.budget_spent = bool(state.get("budget_spent", False))
        if "reference" in state:
            reference = copy.deepcopy(self.ctx.policy).eval().requires_grad_(False)
            reference.load_state_dict(state["reference"])
            self._frozen["reference"] = reference

    def mismatch_summary(self) -> dict:
        """The train/rollout mismatch over the phase: mean of the steps' KL(engine || training model) on the tokens
        trained on, and the largest log-prob gap (empty when no step measured it)."""
        kls = [r["rollout_kl"] for r in self.history if r.get("rollout_kl") is not None]
        if not kls:
            return {}
        gap = max(r["rollout_max_gap"] for r in self.history if "rollout_max_gap" in r)
        return {"rollout_kl": float(f"{sum(kls) / len(kls):.3g}"), "rollout_max_gap": float(f"{gap:.3g}")}

    def curves(self) -> dict[str, list]:
        """Every metric of every rollout step but wall times (s_*): deterministic for a seed. A step without
        an update has no loss: None there."""
        h = self.history
        keys = list(dict.fromkeys(k for row in h for k in row if not k.startswith("s_")))
        return {k: [row.get(k) for row in h] for k in keys}

    def brief_parts(self, summary: dict) -> list[str]:
        first, last = summary.get("reward_first_tenth"), summary.get("reward_last_tenth")
        return [f"reward {first:.2f} -> {last:.2f}"] if first is not None and last is not None else []

    def summary(self) -> dict:
        h = self.history
        if not self.problems:
            return {"kind": self.kind, "steps": 0, "rollout_steps": 0, "optimizer_steps": 0, "problems": 0}
        tenth = max(1, len(h) // 10)

        def mean(key, rows):
            return round(sum(r[key] for r in rows) / len(rows), 4) if rows else None

        if self.budget_spent:
            self.ctx.log(f"phase {self.spec.name}: the run's token budget (budget.generated_tokens) was spent after "
                         f"{self.updates_done()} of {self.spec.steps} update steps")
        elif self.updates_done() < self.spec.steps:
            self.ctx.log(f"phase {self.spec.name}: only {self.update_steps} of {self.spec.steps} rollout steps had a "
                         f"group with signal within {self.max_rollout_steps} rollout steps (grpo.max_rollout_factor)")
        return {"kind": self.kind, "steps": self.updates_done(), "rollout_steps": self.position,
                "optimizer_steps": self.optimizer_steps, "rollouts": int(sum(r.get("rollouts", 0) for r in h)),
                "generated_tokens": int(sum(r.get("generated_tokens", 0) for r in h)),
                "mean_prompts": mean("prompts", h), "problems": len(self.problems), "budget_spent": self.budget_spent,
                "reward_first_tenth": mean("reward", h[:tenth]), "reward_last_tenth": mean("reward", h[-tenth:]),
                "zero_groups": mean("zero_groups", h), "one_groups": mean("one_groups", h),
                **self.mismatch_summary(),
                "seconds_generation": round(sum(r["s_generation"] for r in h), 1),
                "seconds_grading": round(sum(r["s_grading"] for r in h), 1),
                "seconds_training": round(sum(r["s_training"] for r in h), 1)}
