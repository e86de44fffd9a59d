"""Phase runners: what one step of each phase kind does, its budget, its optimiser and its state.

Registered by kind in :data:`PHASES` (``profile``, ``sft``, ``grpo``, ``eval``; a user registers more,
or names one by dotted path). The :class:`~stagewise_pl.stages.StageManager` builds the runner of
each phase with the problems routed to it and hands it the steps of that phase.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stagewise_pl import dist
from stagewise_pl.plan import PhaseSpec
from stagewise_pl.registry import Registry

if TYPE_CHECKING:
    from stagewise_pl.stages import StageManager, StagewiseModule

PHASES: Registry = Registry("phase kind")


def generation_budget(run, override: int) -> int:
    """New tokens per completion: ``override``, else the task's budget (synthetic), else the eval budget."""
    cfg = run.cfg
    return override or (run.task.max_new_tokens() if cfg.data.source == "synthetic" else cfg.eval.max_new_tokens or 512)


class PhaseRunner:
    """One phase's work. Steps are numbered 0, 1, ...; ``position`` is the number done."""

    kind = ""
    trains = False

    def __init__(self, manager: "StageManager", spec: PhaseSpec, problems: list):
        self.manager, self.spec, self.problems = manager, spec, problems
        self.run, self.cfg = manager.run, manager.run.cfg
        self.position = 0

    def has_step(self, step: int) -> bool:
        return step < self.total_steps() and not self.done()

    def total_steps(self) -> int:
        return 1

    def done(self) -> bool:
        return self.position >= self.total_steps()

    def start(self, module: "StagewiseModule", resumed: bool) -> None:
        pass

    def step(self, module: "StagewiseModule", step: int) -> None:
        self.position += 1

    def configure_optimizers(self, module: "StagewiseModule"):
        """An optimiser the trainer can hold; phases that do not train never step it (AdamW allocates no state)."""
        from stagewise_pl.modules.sft import adamw_with_schedule

        return adamw_with_schedule(module.policy, 0.0, (0.9, 0.999), 0.0, 0, 1, 1.0)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def summary(self) -> dict:
        return {"kind": self.kind, "problems": len(self.problems)}


@PHASES.register("eval")
class EvalRunner(PhaseRunner):
    """Evaluates the current policy on the held-out sets (the manager evaluates at the phase's end)."""

    kind = "eval"

    def summary(self) -> dict:
        return {"kind": "eval"}


@PHASES.register("profile")
class ProfileRunner(PhaseRunner):
    """k samples per selected problem at ``profile.temperature``, graded, into the ledger; no training.
    One step per chunk of problems (one generation call and one ledger part); chunks are split across
    ranks and their records gathered, rank 0 writes them."""

    kind = "profile"

    def total_steps(self) -> int:
        return max(1, -(-len(self.problems) // self.cfg.profile.chunk))

    def step(self, module, step: int) -> None:
        from stagewise_pl.models.load import render_prompts
        from stagewise_pl.records import RolloutRecord
        from stagewise_pl.rollout.base import SamplingParams

        cfg, pc, spec = self.cfg, self.cfg.profile, self.spec
        size = pc.chunk
        chunk = self.problems[step * size:(step + 1) * size]
        mine = dist.shard(chunk)
        records: list = []
        if mine:
            seed = int(np.random.default_rng([cfg.run.seed, spec.index, step, dist.rank()]).integers(2**31 - 1))
            sampling = SamplingParams(n=pc.k, temperature=spec.temperature or pc.temperature,
                                      max_new_tokens=generation_budget(self.run, pc.max_new_tokens), seed=seed)
            batch = self.run.engine().generate(render_prompts(self.run.tokenizer, [p.prompt for p in mine]), sampling,
                                               desc=f"{spec.name} {min(len(self.problems), (step + 1) * size)}/"
                                                    f"{len(self.problems)}")
            verdicts = self.run.verifier.score_batch(batch.texts, [p.answer for p in mine for _ in range(pc.k)])
            for i, problem in enumerate(mine):
                rows = range(i * pc.k, (i + 1) * pc.k)
                zero = all(verdicts[r].reward <= 0 for r in rows)
                group = []
                for j, r in enumerate(rows):
                    reward = float(verdicts[r].reward)
                    group.append(RolloutRecord(spec.name, "profile", step, problem.id, j, reward, verdicts[r].reason,
                                               len(batch.completion_ids[r]), batch.finish_reasons[r] == "length",
                                               zero, batch.texts[r] if reward <= 0 else None, 0, spec.index,
                                               module.global_step))
                records.append(group)
        groups = dist.unshard(dist.gather(records))  # per problem, in chunk order, on every rank
        if dist.is_main():
            self.run.ledger.record([r for g in groups for r in g])
        dist.barrier()
        self.run.ledger.refresh()
        self.position += 1

    def summary(self) -> dict:
        from stagewise_pl.eval.evaluate import BUCKETS

        rates = self.run.ledger.pass_rates(self.spec.name)
        counts = {name: sum(1 for p in rates.values() if rule(p)) for name, rule in BUCKETS.items()}
        return {"kind": "profile", "problems": len(rates), "k": self.cfg.profile.k, **counts,
                "mean_pass_rate": round(sum(rates.values()) / max(1, len(rates)), 4)}


@PHASES.register("sft")
class SFTRunner(PhaseRunner):
    """Supervised fine-tuning on the selected problems' ``data.target`` (teacher traces or reference
    solutions): a seeded batch order, ``trainer.accumulate_grad_batches`` micro-batches per optimizer
    step, the completion-only loss through the fused kernel, AdamW with warm-up and cosine decay."""

    kind, trains = "sft", True

    def __init__(self, manager, spec, problems):
        super().__init__(manager, spec, problems)
        from stagewise_pl.data.sft import Collator, StepBatchSampler
        from stagewise_pl.train import build_examples

        cfg = self.cfg
        self.losses: list[float] = []
        if not problems:  # an empty bucket: the phase has nothing to do
            self.examples, self.steps = [], 0
            return
        self.examples = build_examples(self.run.tokenizer, problems, cfg.data.target, cfg.trainer.max_length)
        self.batch_size = spec.batch_size or cfg.trainer.batch_size
        self.accumulate = cfg.trainer.accumulate_grad_batches
        self.steps = spec.budget(len(self.examples), self.batch_size * self.accumulate * dist.world_size())
        self.sampler = StepBatchSampler(len(self.examples), self.batch_size, self.steps * self.accumulate,
                                        cfg.run.seed + spec.index, rank=dist.rank(), world_size=dist.world_size())
        self.collate = Collator(self.run.tokenizer.pad_token_id, cfg.trainer.max_length, cfg.trainer.packing)

    def total_steps(self) -> int:
        return self.steps

    def configure_optimizers(self, module):
        from stagewise_pl.modules.sft import adamw_with_schedule

        o = self.cfg.optim
        return adamw_with_schedule(module.policy, o.lr if self.spec.lr is None else self.spec.lr, o.betas,
                                   o.weight_decay, min(o.warmup_steps, self.steps // 5), self.steps, o.min_lr_ratio)

    def start(self, module, resumed: bool) -> None:
        module.policy.train()

    def step(self, module, step: int) -> None:
        from stagewise_pl.modules.sft import sft_loss

        optimizer, scheduler = module.optimizers(), module.lr_schedulers()
        total, rows = 0.0, 0
        for micro in range(self.accumulate):
            indices = self.sampler.batch(step * self.accumulate + micro)
            batch = {k: v.to(module.device) for k, v in self.collate([self.examples[i] for i in indices]).items()}
            loss, _ = sft_loss(module.policy, batch, self.cfg.trainer.kernel)
            module.manual_backward(loss / self.accumulate)
            total += float(loss.detach()) / self.accumulate
            rows += len(indices)
        if self.cfg.optim.grad_clip:
            module.clip_gradients(optimizer, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.position += 1
        self.losses.append(total)
        module.log_row({f"{self.spec.name}/train/loss": total, f"{self.spec.name}/train/lr":
                        float(scheduler.get_last_lr()[0])}, every=self.cfg.trainer.log_every_n_steps)
        module.bar("loss", total)

    def state_dict(self) -> dict:
        return {"position": self.position, "losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.losses = int(state["position"]), list(state.get("losses", []))

    def summary(self) -> dict:
        if not self.problems:
            return {"kind": "sft", "steps": 0, "problems": 0}
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"kind": "sft", "steps": self.position, "problems": len(self.problems), "examples": len(self.examples),
                "final_loss": round(sum(tail) / len(tail), 4) if tail else None, "target": self.cfg.data.target}


@PHASES.register("grpo")
class GRPORunner(PhaseRunner):
    """GRPO on the selected problems (:mod:`stagewise_pl.modules.grpo` does the step); every graded
    rollout goes to the ledger. The phase ends after ``steps`` rollout steps that made an update, or
    after ``steps x grpo.max_rollout_factor`` rollout steps."""

    kind, trains = "grpo", True

    def __init__(self, manager, spec, problems):
        super().__init__(manager, spec, problems)
        from stagewise_pl.data.sft import StepBatchSampler
        from stagewise_pl.modules.grpo import GRPOModule, GRPOSettings

        cfg, g = self.cfg, self.cfg.grpo
        settings = GRPOSettings.from_config(g, generation_budget(self.run, g.max_new_tokens))
        if spec.batch_size:
            settings.prompts_per_step = spec.batch_size
        if spec.temperature:
            settings.temperature = spec.temperature
        self.max_rollout_steps = spec.steps * g.max_rollout_factor if problems else 0  # an empty bucket: nothing to do
        lr = cfg.optim.lr if spec.lr is None else spec.lr
        self.grpo = GRPOModule(self.run.policy, self.run.tokenizer, self.run.engine(), self.run.verifier, problems,
                               settings, lr=lr, total_steps=spec.steps, weight_decay=cfg.optim.weight_decay,
                               betas=tuple(cfg.optim.betas), warmup_steps=min(cfg.optim.warmup_steps, spec.steps // 5),
                               min_lr_ratio=cfg.optim.min_lr_ratio, grad_clip=cfg.optim.grad_clip,
                               seed=cfg.run.seed + 1000 * spec.index, sink=self.run.ledger, phase_name=spec.name,
                               kernel_backend=cfg.trainer.kernel, phase_index=spec.index)
        # the global batch of prompts of each rollout step; GRPOModule splits it across ranks
        self.sampler = StepBatchSampler(max(1, len(problems)), settings.prompts_per_step, self.max_rollout_steps,
                                        self.grpo.seed)

    def total_steps(self) -> int:
        return self.max_rollout_steps

    def done(self) -> bool:
        return self.grpo.update_steps >= self.spec.steps or self.grpo.rollout_steps >= self.max_rollout_steps

    @property
    def position(self) -> int:
        return self.grpo.rollout_steps if hasattr(self, "grpo") else 0

    @position.setter
    def position(self, value: int) -> None:
        pass  # the GRPO module counts its rollout steps

    def configure_optimizers(self, module):
        return self.grpo.configure_optimizers()

    def start(self, module, resumed: bool) -> None:
        self.grpo.trainer = module.trainer
        self.grpo.on_fit_start()
        self.grpo.on_train_start()

    def step(self, module, step: int) -> None:
        g = self.grpo
        g._current_fx_name = module._current_fx_name  # lets its progress-bar self.log reach the trainer
        g.training_step(self.sampler.batch(step), step)

    def state_dict(self) -> dict:
        state: dict = {"history": self.grpo.history}
        self.grpo.on_save_checkpoint(state)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.grpo.on_load_checkpoint(state)
        self.grpo.history = list(state.get("history", []))

    def summary(self) -> dict:
        g, h = self.grpo, self.grpo.history
        if not self.problems:
            return {"kind": "grpo", "steps": 0, "rollout_steps": 0, "optimizer_steps": 0, "problems": 0}
        tenth = max(1, len(h) // 10)

        def mean(key, rows):
            return round(sum(r[key] for r in rows) / len(rows), 4) if rows else None

        if g.update_steps < self.spec.steps and self.problems:
            self.run.log(f"phase {self.spec.name}: only {g.update_steps} of {self.spec.steps} rollout steps had a "
                         f"group with signal within {self.max_rollout_steps} rollout steps (grpo.max_rollout_factor)")
        return {"kind": "grpo", "steps": g.update_steps, "rollout_steps": g.rollout_steps,
                "optimizer_steps": g.optimizer_steps,
                "problems": len(self.problems), "reward_first_tenth": mean("reward", h[:tenth]),
                "reward_last_tenth": mean("reward", h[-tenth:]), "zero_groups": mean("zero_groups", h),
                "one_groups": mean("one_groups", h),
                "seconds_generation": round(sum(r["s_generation"] for r in h), 1),
                "seconds_grading": round(sum(r["s_grading"] for r in h), 1),
                "seconds_training": round(sum(r["s_training"] for r in h), 1)}
