"""The ``profile`` and ``eval`` phases: measure the policy, train nothing.

``profile`` -- ``profile.k`` samples per selected problem at ``profile.temperature``, graded, into the difficulty
ledger: each problem's pass rate under the current policy, which the routing rules bucket. One step per chunk
of problems (one ledger part); chunks are split across ranks and their records gathered, rank 0 writes them.
With ``profile.sequential`` a chunk is sampled in rounds and a problem stops once its bucket is decided; with
``profile.reuse`` and ``profile.carry`` earlier evidence counts (:mod:`stagewise_pl.routing.evidence`). Each
problem's evidence (what counted) is added to the profile's routing decision, and is what the rules read as its
pass rate. A profile that selects a bucket (``select: hard``) samples only those problems and keeps the latest
profile's evidence on the others. Its summary counts the buckets with the routing's own pass-rate bands.

``eval`` -- the held-out evaluation; the manager evaluates when the phase ends.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from stagewise_pl import dist
from stagewise_pl.phases.base import PHASES, PhaseRunner
from stagewise_pl.phases.sampling import sample_and_grade
from stagewise_pl.plan import PhaseSpec, PhaseTraits, earlier
from stagewise_pl.routing.evidence import HOW, Tally, add, carried_outcome, finish, wanted


@PHASES.register("eval")
class EvalRunner(PhaseRunner):
    """Evaluates the current policy on the held-out sets (the manager evaluates at the phase's end)."""

    kind = "eval"
    traits = PhaseTraits(uses_pool=False, step_unit="")

    def summary(self) -> dict:
        return {"kind": "eval"}


@PHASES.register("profile")
class ProfileRunner(PhaseRunner):
    """k graded samples per selected problem into the ledger (fewer where the evidence suffices)."""

    kind = "profile"
    traits = PhaseTraits(generates=True, records_rollouts=True, step_unit="")
    sampling_group = "profile"

    def __init__(self, ctx, spec, selection):
        super().__init__(ctx, spec, selection)
        self.evidence: dict[str, dict] = {}  # problem id -> Tally.to_json(), for the chunks done
        self._priors: Optional[dict[str, Tally]] = None  # the evidence each problem starts from (reuse, carry)

    @classmethod
    def selection_limits(cls, cfg):
        return cfg.profile.levels, cfg.profile.limit

    def total_steps(self) -> int:
        return max(1, -(-len(self.problems) // self.cfg.profile.chunk))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "evidence": self.evidence}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.evidence = dict(state.get("evidence", {}))

    # ------------------------------------------------------------------ one chunk
    def step(self, module, step: int) -> None:
        size = self.cfg.profile.chunk
        mine = dist.shard(self.problems[step * size:(step + 1) * size])
        results = self.sample(module, mine, step) if mine else []
        results = dist.unshard(dist.gather(results))  # per problem, in chunk order, on every rank
        for pid, tally, _ in results:
            self.evidence[pid] = tally
        if dist.is_main():
            self.ctx.ledger.record([r for _, _, rows in results for r in rows])
        dist.barrier()  # rank 0's part is written: every rank's next ledger query reads it
        self.position += 1

    def sample(self, module, mine: list, step: int) -> list:
        """Rounds of generation until every problem of ``mine`` is decided: (id, evidence, ledger rows) each."""
        from stagewise_pl.records import RolloutRecord
        from stagewise_pl.rollout.base import SamplingParams

        ctx, cfg, pc, spec = self.ctx, self.cfg, self.cfg.profile, self.spec
        key = ctx.rate_key if pc.sequential else None
        round_size = pc.round if key is not None else pc.k
        priors = self.priors(module)
        tallies = {p.id: dataclasses.replace(priors[p.id]) for p in mine}
        drawn: dict[str, list] = {p.id: [] for p in mine}  # (round, reward, reason, tokens, truncated, text)
        engine, upto = ctx.engine_with_current_weights(), min(len(self.problems), (step + 1) * pc.chunk)
        for rnd in range(pc.k + pc.confirm + 1):  # each round draws at least one sample of an undecided problem
            want = [(p, wanted(tallies[p.id], pc.k, pc.confirm, round_size, key)) for p in mine]
            want = [(p, n) for p, n in want if n > 0]
            if not want:
                break
            for count in sorted({n for _, n in want}, reverse=True):  # one generation call per sample count
                group = [p for p, n in want if n == count]
                # the first call is seeded as a full profile's one call always was: a full profile is unchanged
                salt = [] if rnd == 0 and count == max(n for _, n in want) else [rnd, count]
                seed = int(np.random.default_rng([cfg.run.seed, spec.number, step, dist.rank(), *salt])
                           .integers(2**31 - 1))
                sampling = SamplingParams(n=count, temperature=self.temperature(spec),
                                          max_new_tokens=self.max_new_tokens(spec), seed=seed)
                desc = f"{spec.name} {upto}/{len(self.problems)}" + (f" round {rnd + 1}" if rnd else "")
                graded = sample_and_grade(engine, ctx.verifier, ctx.renderer, group, sampling, rnd, desc=desc)
                for i, problem in enumerate(group):
                    rows = range(i * count, (i + 1) * count)
                    for j, r in enumerate(rows):
                        drawn[problem.id].append((rnd, float(graded.rewards[i, j]), graded.reasons[r],
                                                  len(graded.completion_ids[r]), graded.truncated[r], graded.texts[r]))
                    add(tallies[problem.id], [graded.reasons[r] == "correct" for r in rows])
        # correct texts are kept only when replay trains on them
        keep_correct = cfg.data.replay_target in ("own", "own_easy")
        out = []
        for problem in mine:
            samples = drawn[problem.id]
            zero = all(s[1] <= 0 for s in samples)
            rows = [RolloutRecord(phase=spec.name, phase_kind="profile", step=step, problem_id=problem.id,
                                  sample_index=j, reward=reward, reason=reason, completion_tokens=tokens,
                                  truncated=truncated, zero_group=zero,
                                  completion=text if reward <= 0 or keep_correct else None, round=rnd,
                                  phase_index=spec.number, global_step=module.global_step)
                    for j, (rnd, reward, reason, tokens, truncated, text) in enumerate(samples)]
            out.append((problem.id, finish(tallies[problem.id], pc.k).to_json(), rows))
        return out

    # ------------------------------------------------------------------ earlier evidence
    def temperature(self, spec: PhaseSpec) -> float:
        group = sampling_group(spec.kind)
        return spec.temperature or getattr(self.cfg, group).temperature

    def max_new_tokens(self, spec: PhaseSpec) -> int:
        return self.ctx.max_new_tokens(getattr(self.cfg, sampling_group(spec.kind)).max_new_tokens)

    def priors(self, module) -> dict[str, Tally]:
        """The evidence each problem starts from: rollouts under the same policy (``profile.reuse``), else a carried
        all-correct / all-failed outcome (``profile.carry``), else none. Read from the ledger's earlier phases once."""
        if self._priors is not None:
            return self._priors
        pc, spec, ledger = self.cfg.profile, self.spec, self.ctx.ledger
        ids = [p.id for p in self.problems]
        priors = {pid: Tally() for pid in ids}
        before = earlier(self.ctx.plan, spec)
        profiles = [s for s in before if s.kind == "profile"][-pc.carry:] if pc.carry else []
        if pc.carry and len(profiles) == pc.carry:
            last = profiles[-1]
            history = [self.tallies_of(s) for s in profiles]
            since = ledger.tally(ids, first_index=last.number + 1, last_index=spec.number - 1)
            trained = set() if pc.carry_trained else self.chosen_since(last)
            for pid in ids:
                seen = since.get(pid, [0, 0])
                outcome = None if pid in trained else carried_outcome([h.get(pid) for h in history], (seen[0], seen[1]))
                if outcome is not None:
                    c, n = history[-1][pid]
                    priors[pid] = Tally(c + seen[0], n + seen[1], source=last.name, carried=outcome)
        if pc.reuse:
            same = {s.name for s in before if self.same_sampling(s)}
            for pid, (c, n, phases) in ledger.tally(ids, same, global_step=module.global_step).items():
                priors[pid] = Tally(c, n, source=",".join(phases))
        self._priors = priors
        return priors

    def tallies_of(self, profile: PhaseSpec) -> dict[str, tuple[int, int]]:
        """Problem id -> (correct, counted) of an earlier profile: its recorded evidence, else its ledger rows."""
        recorded = self.ctx.decisions.get(profile.name, {}).get("evidence")
        if recorded is not None:
            return {pid: (e["c"], e["n"]) for pid, e in recorded.items()}
        return {pid: (c, n) for pid, (c, n, _) in self.ctx.ledger.tally(None, {profile.name}).items()}

    def chosen_since(self, profile: PhaseSpec) -> set[str]:
        """Problems a training phase after ``profile`` (and before this one) chose (replayed ones not counted)."""
        out: set[str] = set()
        for s in earlier(self.ctx.plan, self.spec, since=profile):
            decision = self.ctx.decisions.get(s.name)
            if decision and self.ctx.traits[s.kind].trains:
                out |= set(decision["selected"]) - set(decision.get("replay", []))
        return out

    def same_sampling(self, spec: PhaseSpec) -> bool:
        """Whether an earlier phase's rollouts are samples of this profile's distribution: a profile, or a kind of the
        GRPO family sampling at top_p 1, at the same temperature and generation length (the same policy, the same
        optimizer step, is checked row by row)."""
        group = sampling_group(spec.kind)
        return (spec.name != self.spec.name and group is not None and (group != "grpo" or self.cfg.grpo.top_p == 1.0)
                and self.temperature(spec) == self.temperature(self.spec)
                and self.max_new_tokens(spec) == self.max_new_tokens(self.spec))

    # ------------------------------------------------------------------ results
    def all_evidence(self) -> dict[str, dict]:
        """Every problem's evidence: this profile's, and with a ``select`` the latest profile's on the others."""
        out: dict[str, dict] = {}
        profiles = [s for s in earlier(self.ctx.plan, self.spec) if s.kind == "profile"]
        if self.spec.select != "all" and profiles:
            out = {pid: {"c": c, "n": n, "fresh": 0, "how": "kept", "from": profiles[-1].name}
                   for pid, (c, n) in self.tallies_of(profiles[-1]).items() if pid not in self.evidence}
        # problems this profile graded before it kept evidence (a checkpoint of an earlier version): their rows
        recorded = self.ctx.ledger.tally(None, {self.spec.name})
        out.update({pid: {"c": c, "n": n, "fresh": n, "how": "sampled"} for pid, (c, n, _) in recorded.items()
                    if pid not in self.evidence})
        out.update(self.evidence)
        return out

    def record(self) -> dict:
        return {"evidence": self.all_evidence()}

    def brief_parts(self, summary: dict) -> list[str]:
        if summary.get("hard") is None:
            return []
        return [f"easy/medium/hard {summary['easy']}/{summary['medium']}/{summary['hard']}",
                f"mean p {summary['mean_pass_rate']:.3f}"]

    def summary(self) -> dict:
        evidence = self.all_evidence()
        rates = [e["c"] / e["n"] for e in evidence.values() if e["n"]]
        spent = self.ctx.ledger.tokens_by_phase().get(self.spec.name, {"rollouts": 0, "tokens": 0})
        how = {name: 0 for name in HOW}
        for e in evidence.values():
            how[e["how"]] += 1
        return {"kind": "profile", "problems": len(rates), "k": self.cfg.profile.k,
                **self.ctx.bands.counts(rates),
                "mean_pass_rate": round(sum(rates) / max(1, len(rates)), 4),
                "rollouts": spent["rollouts"], "generated_tokens": spent["tokens"],
                "decided_by": {k: v for k, v in how.items() if v}}


def sampling_group(kind: str) -> Optional[str]:
    """The config group a kind samples with (its runner's ``sampling_group``: ``profile``, ``grpo`` for the GRPO
    family), None for other kinds."""
    from stagewise_pl.phases.base import runner_class

    try:
        return runner_class(kind).sampling_group
    except (KeyError, ImportError):
        return None
