"""Phase runners: what one step of each phase kind does, its budget, its optimiser and its state.

Registered by kind in :data:`PHASES` (``profile``, ``sft``, ``grpo``, ``eval``; a user registers more,
or names one by dotted path). The :class:`~stagewise_pl.stages.StageManager` builds the runner of
each phase with the problems routed to it and hands it the steps of that phase.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import numpy as np

from stagewise_pl import dist
from stagewise_pl.faults import fault_point, poisoned
from stagewise_pl.nonfinite import NonFiniteGuard
from stagewise_pl.plan import PhaseSpec
from stagewise_pl.registry import Registry

if TYPE_CHECKING:
    from stagewise_pl.stages import StageManager, StagewiseModule

PHASES: Registry = Registry("phase kind")


def generation_budget(run, override: int) -> int:
    """New tokens per completion: ``override``, else the task's budget (synthetic), else the eval budget."""
    cfg = run.cfg
    return override or (run.task.max_new_tokens() if cfg.data.source == "synthetic" else cfg.eval.max_new_tokens or 512)


GENERATING = ("profile", "grpo", "bridge_sft", "cft")  # phase kinds whose student samples count as generated


def generation_spent(run, specs, current) -> dict:
    """Tokens the student generated in the phases before ``current`` (their summaries in ``state.json``), the
    estimated cost of the non-GRPO phases after it (each as the latest earlier phase of its kind cost; 0 when
    there is none) and the tokens per sample of the latest profile or GRPO phase (else half the budget)."""
    done = run._state()["completed"]
    earlier = [s for s in specs[:current.index - 1] if s.name in done]
    tokens = sum(int(done[s.name].get("generated_tokens", 0)) for s in earlier)
    latest = {s.kind: done[s.name] for s in earlier}
    reserve = sum(int(latest.get(s.kind, {}).get("generated_tokens", 0))
                  for s in specs[current.index:] if s.kind in GENERATING and s.kind != "grpo")
    sampled = [done[s.name] for s in earlier if s.kind in ("profile", "grpo") and done[s.name].get("rollouts")]
    per_sample = (sampled[-1]["generated_tokens"] / sampled[-1]["rollouts"]) if sampled else \
        generation_budget(run, run.cfg.grpo.max_new_tokens) / 2
    return {"tokens": tokens, "reserve": reserve, "per_sample": per_sample}


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

    def curves(self) -> dict[str, list]:
        """Per-step series of the phase (written to ``<run>/curves/`` when it ends); {} = none."""
        return {}


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
            keep_correct = cfg.data.replay_target == "own"  # correct texts are kept only when replay trains on them
            for i, problem in enumerate(mine):
                rows = range(i * pc.k, (i + 1) * pc.k)
                zero = all(verdicts[r].reward <= 0 for r in rows)
                group = []
                for j, r in enumerate(rows):
                    reward = float(verdicts[r].reward)
                    group.append(RolloutRecord(spec.name, "profile", step, problem.id, j, reward, verdicts[r].reason,
                                               len(batch.completion_ids[r]), batch.finish_reasons[r] == "length",
                                               zero, batch.texts[r] if reward <= 0 or keep_correct else None, 0, spec.index,
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
        spent = self.run.ledger.tokens_by_phase().get(self.spec.name, {"rollouts": 0, "tokens": 0})
        return {"kind": "profile", "problems": len(rates), "k": self.cfg.profile.k, **counts,
                "mean_pass_rate": round(sum(rates.values()) / max(1, len(rates)), 4),
                "rollouts": spent["rollouts"], "generated_tokens": spent["tokens"]}


@PHASES.register("sft")
class SFTRunner(PhaseRunner):
    """Supervised fine-tuning on the selected problems' ``data.target`` (teacher traces or reference
    solutions): a seeded batch order, ``trainer.accumulate_grad_batches`` micro-batches per optimizer
    step, the completion-only loss through the fused kernel, AdamW with warm-up and cosine decay."""

    kind, trains = "sft", True

    def __init__(self, manager, spec, problems):
        super().__init__(manager, spec, problems)
        from stagewise_pl.data.sft import Collator
        from stagewise_pl.train import build_examples

        cfg = self.cfg
        self.losses: list[float] = []
        self.examples: list = []
        self.guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps, spec.name)
        if not problems:  # an empty bucket: the phase has nothing to do
            self.steps = 0
            return
        self.batch_size = spec.batch_size or cfg.trainer.batch_size
        self.accumulate = cfg.trainer.accumulate_grad_batches
        self.steps = spec.budget(len(problems), self.batch_size * self.accumulate * dist.world_size())
        self.collate = Collator(self.run.tokenizer.pad_token_id, self.max_length(), cfg.trainer.packing)
        if not self.builds_at_start:
            replayed = set(self.replay_targets())
            self.prepare(build_examples(self.run.tokenizer, [p for p in problems if p.id not in replayed],
                                        cfg.data.target, cfg.trainer.max_length) + self.replay_examples())

    def replay_targets(self) -> dict[str, str]:
        """Replayed problem id -> its target when the routing chose the student's own solutions (data.replay_target
        = own); {} otherwise."""
        return self.manager.decisions.get(self.spec.name, {}).get("replay_targets") or {}

    def replay_examples(self) -> list:
        """Examples of the problems replayed with the student's own solutions ([] unless data.replay_target = own;
        otherwise replayed problems train on data.target like the rest)."""
        from stagewise_pl.train import encode_pairs

        own = self.replay_targets()
        if own:
            by_id = {p.id: p for p in self.problems}
            return encode_pairs(self.run.tokenizer, [(by_id[pid].prompt, text) for pid, text in own.items()],
                                self.cfg.trainer.max_length)
        return []

    builds_at_start = False  # True: the examples are made in start() (they need the policy as the phase begins)

    def max_length(self) -> int:
        return self.cfg.trainer.max_length

    def prepare(self, examples: list) -> None:
        """The phase's examples and its seeded batch order; no examples ends the phase."""
        from stagewise_pl.data.sft import StepBatchSampler

        self.examples = examples
        if not examples:
            self.steps = 0
            return
        self.sampler = StepBatchSampler(len(examples), self.batch_size, self.steps * self.accumulate,
                                        self.cfg.run.seed + self.spec.index, rank=dist.rank(),
                                        world_size=dist.world_size())

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
            if poisoned(f"nan_loss:{self.spec.name}:{step + 1}"):
                loss = loss * float("nan")
            module.manual_backward(loss / self.accumulate)
            total += float(loss.detach()) / self.accumulate
            rows += len(indices)
        fault_point("sft_backward")
        if not self.guard.ok(total, module.policy.parameters(), step + 1):  # NaN/inf: no update, the step is used up
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self.position += 1
            module.log_row({f"{self.spec.name}/train/nonfinite_skipped": float(self.guard.skipped)})
            return
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
        return {"position": self.position, "losses": self.losses, "nonfinite": self.guard.state_dict()}

    def curves(self) -> dict[str, list]:
        return {"loss": self.losses} if self.losses else {}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.losses = int(state["position"]), list(state.get("losses", []))
        self.guard.load_state_dict(state.get("nonfinite", {}))

    def summary(self) -> dict:
        if not self.problems:
            return {"kind": self.kind, "steps": 0, "problems": 0}
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"kind": self.kind, "steps": self.position, "optimizer_steps": len(self.losses),
                "problems": len(self.problems), "examples": len(self.examples), "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
                "target": self.cfg.data.target, **({"nonfinite_skipped": self.guard.skipped} if self.guard.skipped else {})}


class TaughtRunner(SFTRunner):
    """SFT on targets made when the phase starts (by rank 0, broadcast to the others), kept in the
    checkpoint so a resumed phase trains on the same ones, and written to ``<run>/<folder>/NN-<phase>.jsonl``
    with a summary. Replayed problems (``replay``) keep their plain ``data.target``."""

    builds_at_start = True
    folder = ""

    def __init__(self, manager, spec, problems):
        super().__init__(manager, spec, problems)
        replayed = set(manager.decisions.get(spec.name, {}).get("replay", []))
        self.taught = [p for p in problems if p.id not in replayed]
        self.replayed = [p for p in problems if p.id in replayed]
        self.rows: Optional[list[dict]] = None  # (problem id, kind, prompt, target) per example, once made
        self.report: dict = {}

    def make_rows(self) -> tuple[list[dict], dict]:
        raise NotImplementedError

    def weight(self, kind: str) -> float:
        return 1.0

    def start(self, module, resumed: bool) -> None:
        super().start(module, resumed)
        if not self.steps or self.examples:
            return
        if self.rows is None:  # a fresh phase (a resumed one has its rows from the checkpoint)
            payload = self.make_and_write() if dist.is_main() else None
            self.rows, self.report = dist.broadcast(payload)
        self.prepare(self.encode(self.rows))

    def make_and_write(self) -> tuple[list[dict], dict]:
        from stagewise_pl.run import atomic_write

        rows, report = self.make_rows()
        base = self.run.dir / self.folder / f"{self.spec.index:02d}-{self.spec.name}"
        atomic_write(base.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write(base.with_suffix(".summary.json"), json.dumps(report, indent=1))
        self.run.log(f"phase {self.spec.name}: {self.describe(report)}")
        return rows, report

    def describe(self, report: dict) -> str:
        return json.dumps(report)

    def encode(self, rows: list[dict]) -> list:
        from stagewise_pl.train import build_examples, encode_pairs

        tok = self.run.tokenizer
        examples = encode_pairs(tok, [(r["prompt"], r["target"], self.weight(r["kind"])) for r in rows], self.max_length())
        if self.replay_targets():
            examples += self.replay_examples()
        elif self.replayed:
            examples += build_examples(tok, self.replayed, self.cfg.data.target, self.cfg.trainer.max_length)
        return examples

    def context(self):
        """The Bridge context of this phase: the student as it is now, the teacher, the verifier, the templates."""
        from stagewise_pl.bridge import BridgeContext

        cfg, run = self.cfg, self.run
        return BridgeContext(run.policy, run.tokenizer, run.engine(), run.verifier, run.teacher(), run.prompts,
                             cfg.bridge, cfg.bridge.max_new_tokens or generation_budget(run, 0),
                             seed=cfg.run.seed + 1000 * self.spec.index + 17, max_length=cfg.trainer.max_length,
                             batch_size=cfg.eval.batch_size, kernel=cfg.trainer.kernel, progress=cfg.run.progress_bar)

    def state_dict(self) -> dict:
        return dict(super().state_dict(), rows=self.rows, report=self.report)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rows, self.report = state.get("rows"), state.get("report") or {}

    def summary(self) -> dict:
        scalars = {k: v for k, v in self.report.items() if not isinstance(v, (dict, list))}
        return dict(super().summary(), target=self.folder, **scalars)


@PHASES.register("bridge_sft")
class BridgeSFTRunner(TaughtRunner):
    """SFT on teacher traces made learnable by the student (``bridge.strategy``, :mod:`stagewise_pl.bridge`):
    acceptance and the student's NLL of bridged vs raw targets are logged before training."""

    kind, folder = "bridge_sft", "bridge"

    def make_rows(self):
        from stagewise_pl.bridge import make_strategy, run_bridge

        ctx = self.context()
        items, report = run_bridge(make_strategy(self.cfg.bridge), ctx, self.taught)
        report["generated_tokens"] = ctx.generated_tokens
        by_id = {p.id: p for p in self.taught}
        rows = [{"problem_id": it.problem_id, "kind": "bridged" if it.kept else "raw",
                 "prompt": by_id[it.problem_id].prompt, "target": it.target, "raw": it.raw, "reason": it.reason,
                 "nll_raw": it.nll_raw, "nll_target": it.nll_target} for it in items if it.target is not None]
        return rows, report

    def describe(self, r: dict) -> str:
        return (f"bridge {r['strategy']}: {r['kept']} of {r['problems']} bridged (acceptance {r['acceptance']}), "
                f"{r['fell_back_to_raw']} raw, {r['dropped']} dropped; student NLL raw {r['nll_raw']} -> "
                f"target {r['nll_target']}; candidates {r['candidates']}")

    def start(self, module, resumed: bool) -> None:
        super().start(module, resumed)
        r = self.report
        if r and not resumed:
            module.log_row({f"{self.spec.name}/bridge/{k}": float(v) for k, v in r.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})


@PHASES.register("cft")
class CFTRunner(TaughtRunner):
    """Critique fine-tuning (:mod:`stagewise_pl.cft`): diagnoses, verified repairs and bridged traces of the
    selected problems' failed rollouts, each kind's loss weighted by ``cft.weights``, loss on the target only."""

    kind, folder = "cft", "cft"

    def max_length(self) -> int:
        return self.cfg.cft.max_length

    def weight(self, kind: str) -> float:
        return float(self.cfg.cft.weights.get(kind, 1.0))

    def failures(self) -> dict[str, list[str]]:
        """Each problem's failed rollouts in the latest earlier profile or grpo phase that graded it."""
        out: dict[str, list[str]] = {}
        for spec in reversed(self.manager.specs[:self.spec.index - 1]):
            if spec.kind in ("profile", "grpo"):
                for pid, texts in self.run.ledger.failures_by_problem(spec.name).items():
                    out.setdefault(pid, texts)
        return out

    def make_rows(self):
        from stagewise_pl.bridge import make_strategy
        from stagewise_pl.cft import build_cft

        ctx = self.context()
        items, report = build_cft(ctx, self.run.teacher(critic=True), self.run.teacher(),
                                  make_strategy(self.cfg.bridge), self.taught, self.failures(), self.cfg.cft)
        report["generated_tokens"] = ctx.generated_tokens
        return [{"problem_id": it.problem_id, "kind": it.kind, "prompt": it.prompt, "target": it.target,
                 "failure": it.failure} for it in items], report

    def describe(self, r: dict) -> str:
        return f"CFT data from {r['failures']} failures of {r['problems']} problems: kept {r['kept']}; {r['outcomes']}"


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
        self.before: Optional[dict] = None  # grpo.token_budget: generation_spent() of the phases before this one
        lr = cfg.optim.lr if spec.lr is None else spec.lr
        self.grpo = GRPOModule(self.run.policy, self.run.tokenizer, self.run.engine(), self.run.verifier, problems,
                               settings, lr=lr, total_steps=spec.steps, weight_decay=cfg.optim.weight_decay,
                               betas=tuple(cfg.optim.betas), warmup_steps=min(cfg.optim.warmup_steps, spec.steps // 5),
                               min_lr_ratio=cfg.optim.min_lr_ratio, grad_clip=cfg.optim.grad_clip,
                               seed=cfg.run.seed + 1000 * spec.index, sink=self.run.ledger, phase_name=spec.name,
                               kernel_backend=cfg.trainer.kernel, phase_index=spec.index,
                               max_nonfinite_steps=cfg.optim.max_nonfinite_steps)
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
        if self.cfg.grpo.token_budget:
            count = dist.broadcast(self.budget_prompts() if dist.is_main() else None)
            # seeded by phase and step; past the phase's problem count a problem gets a second group (more
            # samples of it), so a small bucket can still take its share of the budget
            rng, batch = np.random.default_rng([g.seed, step, 11]), []
            while len(batch) < count:
                batch += rng.permutation(len(self.problems))[:count - len(batch)].tolist()
        else:
            batch = self.sampler.batch(step)
        g.training_step(batch, step)

    # ------------------------------------------------------------------ the run's budget of generated tokens
    def budget_prompts(self) -> int:
        """Prompts for this rollout step under ``grpo.token_budget`` (rank 0): what is left of the budget after
        the tokens spent so far and the estimated cost of the later non-GRPO phases, spread evenly over the
        GRPO rollout steps still to come (this phase's and later ones' updates, times the rollout steps per update
        so far), divided by the cost of one prompt's group."""
        g, spent = self.cfg.grpo, self.spent()
        steps_left = max(1, self.spec.steps - self.grpo.update_steps) + sum(
            s.steps or 0 for s in self.manager.specs[self.spec.index:] if s.kind == "grpo")
        # rollout steps whose groups were all flat make no update but cost tokens: expect as many as so far
        steps_left *= max(1.0, self.grpo.rollout_steps / max(1, self.grpo.update_steps))
        done = [h for h in self.grpo.history if h.get("rollouts")]
        per_sample = (sum(h["generated_tokens"] for h in done) / sum(h["rollouts"] for h in done)) if done else \
            self.before["per_sample"]
        per_step = (g.token_budget - spent["before"] - spent["now"] - self.before["reserve"]) / steps_left
        return int(min(g.max_prompts_per_step, max(1, round(per_step / max(1.0, per_sample * g.num_generations)))))

    def spent(self) -> dict:
        if self.before is None:  # what earlier phases spent: fixed once the phase runs
            self.before = generation_spent(self.run, self.manager.specs, self.spec)
        return {"before": self.before["tokens"], "now": sum(h.get("generated_tokens", 0) for h in self.grpo.history)}

    def curves(self) -> dict[str, list]:
        """Every metric of every rollout step but wall times (s_*): deterministic for a seed. A step without
        an update has no loss: None there."""
        h = self.grpo.history
        keys = list(dict.fromkeys(k for row in h for k in row if not k.startswith("s_")))
        return {k: [row.get(k) for row in h] for k in keys}

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
                "optimizer_steps": g.optimizer_steps, "rollouts": int(sum(r.get("rollouts", 0) for r in h)),
                "generated_tokens": int(sum(r.get("generated_tokens", 0) for r in h)),
                "mean_prompts": mean("prompts", h),
                "problems": len(self.problems), "reward_first_tenth": mean("reward", h[:tenth]),
                "reward_last_tenth": mean("reward", h[-tenth:]), "zero_groups": mean("zero_groups", h),
                "one_groups": mean("one_groups", h),
                "seconds_generation": round(sum(r["s_generation"] for r in h), 1),
                "seconds_grading": round(sum(r["s_grading"] for r in h), 1),
                "seconds_training": round(sum(r["s_training"] for r in h), 1)}
