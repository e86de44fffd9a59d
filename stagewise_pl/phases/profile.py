"""The ``profile`` and ``eval`` phases: measure the policy, train nothing.

``profile`` -- ``profile.k`` samples per selected problem at ``profile.temperature``, graded, into the difficulty
ledger: each problem's pass rate under the current policy, which the routing rules bucket. One step per chunk
of problems (one generation call, one ledger part); chunks are split across ranks and their records gathered,
rank 0 writes them. Its summary counts the buckets with the routing's own pass-rate bands.

``eval`` -- the held-out evaluation; the manager evaluates when the phase ends.
"""
from __future__ import annotations

import numpy as np

from stagewise_pl import dist
from stagewise_pl.phases.base import PHASES, PhaseRunner
from stagewise_pl.plan import PhaseTraits


@PHASES.register("eval")
class EvalRunner(PhaseRunner):
    """Evaluates the current policy on the held-out sets (the manager evaluates at the phase's end)."""

    kind = "eval"
    traits = PhaseTraits(uses_pool=False, step_unit="")

    def summary(self) -> dict:
        return {"kind": "eval"}


@PHASES.register("profile")
class ProfileRunner(PhaseRunner):
    """k graded samples per selected problem into the ledger."""

    kind = "profile"
    traits = PhaseTraits(generates=True, records_rollouts=True, step_unit="")

    @classmethod
    def selection_limits(cls, cfg):
        return cfg.profile.levels, cfg.profile.limit

    def total_steps(self) -> int:
        return max(1, -(-len(self.problems) // self.cfg.profile.chunk))

    def step(self, module, step: int) -> None:
        from stagewise_pl.models.load import render_prompts
        from stagewise_pl.records import RolloutRecord
        from stagewise_pl.rollout.base import SamplingParams

        ctx, cfg, pc, spec = self.ctx, self.cfg, self.cfg.profile, self.spec
        size = pc.chunk
        chunk = self.problems[step * size:(step + 1) * size]
        mine = dist.shard(chunk)
        records: list = []
        if mine:
            seed = int(np.random.default_rng([cfg.run.seed, spec.number, step, dist.rank()]).integers(2**31 - 1))
            sampling = SamplingParams(n=pc.k, temperature=spec.temperature or pc.temperature,
                                      max_new_tokens=ctx.max_new_tokens(pc.max_new_tokens), seed=seed)
            batch = ctx.engine_with_current_weights().generate(
                render_prompts(ctx.tokenizer, [p.prompt for p in mine]), sampling,
                desc=f"{spec.name} {min(len(self.problems), (step + 1) * size)}/{len(self.problems)}")
            verdicts = ctx.verifier.score_batch(batch.texts, [p.answer for p in mine for _ in range(pc.k)])
            keep_correct = cfg.data.replay_target == "own"  # correct texts are kept only when replay trains on them
            for i, problem in enumerate(mine):
                rows = range(i * pc.k, (i + 1) * pc.k)
                zero = all(verdicts[r].reward <= 0 for r in rows)
                group = []
                for j, r in enumerate(rows):
                    reward = float(verdicts[r].reward)
                    group.append(RolloutRecord(spec.name, "profile", step, problem.id, j, reward, verdicts[r].reason,
                                               len(batch.completion_ids[r]), batch.finish_reasons[r] == "length",
                                               zero, batch.texts[r] if reward <= 0 or keep_correct else None, 0,
                                               spec.number, module.global_step))
                records.append(group)
        groups = dist.unshard(dist.gather(records))  # per problem, in chunk order, on every rank
        if dist.is_main():
            ctx.ledger.record([r for g in groups for r in g])
        dist.barrier()
        ctx.ledger.refresh()
        self.position += 1

    def summary(self) -> dict:
        ledger = self.ctx.ledger
        rates = ledger.pass_rates(self.spec.name)
        spent = ledger.tokens_by_phase().get(self.spec.name, {"rollouts": 0, "tokens": 0})
        return {"kind": "profile", "problems": len(rates), "k": self.cfg.profile.k,
                **self.ctx.bands.counts(rates.values()),
                "mean_pass_rate": round(sum(rates.values()) / max(1, len(rates)), 4),
                "rollouts": spent["rollouts"], "generated_tokens": spent["tokens"]}
