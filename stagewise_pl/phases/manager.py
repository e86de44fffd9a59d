"""The phase manager: one Lightning fit runs the whole plan, phase after phase, on one strategy.

The training "data" is a stream of tokens ``(phase position, step)`` (:class:`PlanTokens`); the step that
receives the first token of the next phase first closes the current one (summary, export, evaluation,
``state.json``), routes the next one (the rules' buckets, then :func:`~stagewise_pl.routing.selection.select_problems`),
builds its runner and optimiser, and writes a checkpoint. The process group and the in-memory policy persist:
no relaunch and no reload from disk between phases. The manager reads the run only through its
:class:`~stagewise_pl.phases.context.PhaseContext`.

Checkpoints (``<run>/checkpoints/last.ckpt``, written aside and renamed, :mod:`stagewise_pl.checkpoints`) hold
the model, the phase's optimiser and schedule, and the manager's state: the phase position, the runner's state,
every routing decision so far, the ledger position and the RNG states. A run killed at any point and resumed
with ``resume=last`` continues in the same phase at the same step and ends with the weights and ledger of an
uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import replace
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stagewise_pl import checkpoints, dist
from stagewise_pl.config import ConfigError
from stagewise_pl.faults import fault_point
from stagewise_pl.io import atomic_write
from stagewise_pl.phases.base import PhaseRunner, runner_class
from stagewise_pl.phases.context import PhaseContext
from stagewise_pl.phases.driver import relabel_progress
from stagewise_pl.phases.gating import PhaseGating, retry_spec
from stagewise_pl.plan import PhaseSpec, carried_steps, earlier
from stagewise_pl.preempt import Preempted
from stagewise_pl.routing import RoutingView
from stagewise_pl.routing.selection import Selection, route_phase, rule_names, select_problems
from stagewise_pl.rundir import FORMAT


class PlanTokens:
    """The stream Lightning trains on: ``(phase position, step)`` for every step the plan will take.

    Lightning fetches one token ahead of the step it trains. A phase's length is known only once the phase has
    started (its bucket is routed at that moment), so for a phase not yet started the stream offers its next
    step and the runner ignores a step beyond its count."""

    def __init__(self, manager: "PhaseManager"):
        self.manager = manager

    def __iter__(self):
        m = self.manager
        pos = max(0, m.pos)
        while pos < len(m.specs):
            step = m.runner.position if pos == m.pos and m.runner is not None else 0
            while m.may_have(pos, step):
                yield pos, step
                step += 1
            pos += 1


class PhaseManager(L.Callback):
    """Runs the plan inside one Lightning fit; its state is in every checkpoint."""

    def __init__(self, ctx: PhaseContext, rules: Sequence, fingerprint: str = ""):
        # specs is the context's plan itself: a phase a gate retries is added to it (see routing.gate)
        self.ctx, self.specs, self.rules, self.fingerprint = ctx, ctx.plan, list(rules), fingerprint
        self.pos = -1  # the current phase (index into specs); -1 = not started
        self.runner: Optional[PhaseRunner] = None
        self.decisions: dict[str, dict] = ctx.decisions  # shared with the runners (a profile reads earlier ones)
        self._resumed: Optional[dict] = None  # state loaded from a checkpoint, applied when the runner exists
        self.columns: dict = {}  # evaluation label -> results
        self.phase_started = time.time()
        self.gating = PhaseGating(ctx, self.rules)  # the development split and the phase gates

    @property
    def state_key(self) -> str:
        return "PhaseManager"

    # --------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        return {"format": FORMAT, "phase": self.pos, "runner": self.runner.state_dict() if self.runner else None,
                "decisions": self.decisions, "ledger": self.ctx.ledger.state_dict(),
                "fingerprint": self.fingerprint, "rng": rng_states()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ConfigError(f"resume: the checkpoint was written by another version of stagewise_pl (format "
                              f"{state.get('format', 1)}, this version reads {FORMAT}); start a new run.dir")
        if state.get("fingerprint") != self.fingerprint and not self.ctx.cfg.run.force:
            raise ConfigError(f"resume: the checkpoint was written by another plan or other training data "
                              f"(fingerprint {state.get('fingerprint')} != {self.fingerprint}); pass run.force=true to "
                              f"resume anyway")
        if dist.is_main():
            self.ctx.ledger.load_state_dict(state["ledger"])  # parts written after the checkpoint are redone
        dist.barrier()  # every rank's ledger queries then see the parts as rank 0 left them (by their stamps)
        self.decisions.clear()
        self.decisions.update(state["decisions"])
        for spec in list(self.specs):  # the phases a gate added before the checkpoint
            if self.decisions.get(spec.name, {}).get("gate", {}).get("action") == "retry":
                self.add_retry(spec)
        self._resumed = state
        set_rng_states(state["rng"])

    # --------------------------------------------------------------- the plan
    def may_have(self, pos: int, step: int) -> bool:
        if pos < self.pos:
            return False
        if pos > self.pos or self.runner is None:
            return True  # not started: its length is not known yet
        return self.runner.has_step(step)

    def configure_optimizers(self, module):
        """Called by Lightning once at set-up (after a checkpoint's callback state is restored)."""
        if self.runner is None:
            resumed = self._resumed
            self.enter(resumed["phase"] if resumed else 0, resumed["runner"] if resumed else None)
        return self.runner.configure_optimizers(module)

    def add_retry(self, spec: PhaseSpec) -> PhaseSpec:
        """After a gate's ``retry`` of ``spec``: its second run, on the same problems, next in the plan."""
        again = retry_spec(spec, self.ctx.cfg.optim.lr)
        if all(s.name != again.name for s in self.specs):
            self.specs.insert(self.specs.index(spec) + 1, again)
            self.decisions.setdefault(again.name, {**{k: v for k, v in self.decisions[spec.name].items()
                                                      if k not in ("gate", "evidence")}, "retry_of": spec.name})
        return again

    def step(self, module, token) -> None:
        pos, step = token
        if pos != self.pos:
            self.close_phase(module, last=False)
            self.enter(pos, None)
            trainer = module.trainer
            trainer.strategy.setup_optimizers(trainer)
            # Lightning counts optimizer steps through hooks it puts on the optimizers at the start of each
            # batch: the optimizer built within this batch needs them now
            trainer.fit_loop.epoch_loop.manual_optimization.on_run_start()
            self.gating.snapshot(self.runner.spec)
            self.runner.start(module, resumed=False)
            relabel_progress(trainer, f"phase {self.runner.spec.name}")
            self.save(module.trainer)
            self.gating.prune(self.runner.spec)
        runner, saved = self.runner, False
        if step == runner.position and not runner.done():  # else a step beyond the phase's count (offered
            runner.step(module, step)                      # before the phase knew it): nothing to do
            fault_point(f"step:{runner.spec.name}:{runner.position}")
            if runner.position % self.ctx.cfg.trainer.checkpoint_every_n_steps == 0:
                self.save(module.trainer)
                saved = True
                fault_point(f"checkpoint:{runner.spec.name}:{runner.position}")
        signum = self.stop_requested()
        if signum is not None:  # SIGUSR1 / SIGTERM / Ctrl-C: this step is kept, then the run stops
            if not saved:
                self.save(module.trainer)
            raise Preempted(signum, f"phase {runner.spec.name} step {runner.position}", str(self.last_checkpoint()))

    def last_checkpoint(self):
        return self.ctx.rundir.checkpoints / checkpoints.LAST

    def stop_requested(self) -> Optional[int]:
        """The signal that asks the run to stop (see :mod:`stagewise_pl.preempt`), agreed by every rank."""
        watch = self.ctx.signals
        mine = watch.signum if watch is not None else None
        if dist.world_size() == 1:
            return mine
        return next((s for s in dist.gather(mine) if s is not None), None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Lightning stops on SIGTERM at a batch boundary of its own (a signal that came after this step's
        check): the state is whole there, so it is checkpointed before the run exits."""
        if isinstance(exception, SIGTERMException) and self.runner is not None:
            self.save(trainer)

    # --------------------------------------------------------------- routing
    def selection(self, spec: PhaseSpec) -> Selection:
        """The phase's problems: decided on rank 0 and broadcast (or, after a resume, the decision on record)."""
        ctx = self.ctx
        traits = ctx.traits[spec.kind]
        source = ctx.gradable_pool() if traits.gradable_only else ctx.pool
        if spec.name not in self.decisions:
            decision = self.decide(spec) if dist.is_main() else None
            decision = dist.broadcast(decision)
            if decision.get("error"):  # raised on every rank alike
                raise ConfigError(decision["error"])
            self.decisions[spec.name] = decision
        decision = self.decisions[spec.name]
        by_id = {p.id: p for p in source}
        return Selection(spec.name, spec.kind, spec.select, [by_id[i] for i in decision["selected"]],
                         list(decision.get("replay", [])), dict(decision.get("replay_targets") or {}),
                         list(decision.get("rules", [])), dict(decision.get("ids", {})), decision.get("error"))

    def decide(self, spec: PhaseSpec) -> dict:
        ctx, cfg = self.ctx, self.ctx.cfg
        traits = ctx.traits[spec.kind]
        gradable = ctx.gradable_pool()
        source = gradable if traits.gradable_only else ctx.pool
        chosen, buckets = None, {}
        if traits.uses_pool and spec.select != "all":
            view = RoutingView(ctx.ledger, {p.id: p for p in gradable}, earlier(self.specs, spec), spec,
                               {n: d["evidence"] for n, d in self.decisions.items() if "evidence" in d})
            buckets, chosen = route_phase(spec, self.rules, view, ctx.log)
        solved = None
        if spec.replay > 0 and cfg.data.replay_target in ("own", "own_easy"):
            solved = self.own_solutions(spec, easy_only=cfg.data.replay_target == "own_easy")
            if not solved:
                ctx.log(f"phase {spec.name}: data.replay_target={cfg.data.replay_target}, but no earlier profile "
                        f"solved a problem{' it found easy' if cfg.data.replay_target == 'own_easy' else ''}: "
                        f"no replay")
        levels, limit = runner_class(spec.kind).selection_limits(cfg)
        decision = select_problems(spec, traits, source, chosen, cfg.run.seed, levels, limit, solved, buckets,
                                   rule_names(self.rules)).decision()
        atomic_write(ctx.rundir.phase_file("routing", spec.number, spec.name), json.dumps(decision, indent=1))
        return decision

    def own_solutions(self, spec: PhaseSpec, easy_only: bool = False) -> dict[str, list[str]]:
        """Problem id -> the student's correct completions in the latest profile before ``spec`` ({} if none):
        profiles keep them with data.replay_target=own or own_easy (the option is defined on profiles). ``easy_only``:
        only the problems that profile put in the easy bucket (the run's pass-rate bands)."""
        profiles = [s for s in earlier(self.specs, spec) if s.kind == "profile"]
        if not profiles:
            return {}
        ledger, latest = self.ctx.ledger, profiles[-1].name
        solved = dict(ledger.correct_by_problem(latest))
        evidence = self.decisions.get(latest, {}).get("evidence", {})
        for source in sorted({e["from"] for e in evidence.values() if e.get("how") == "kept"}):
            # problems the latest profile kept without sampling: their texts are in the profile they were kept from
            older = ledger.correct_by_problem(source)
            solved.update({pid: older[pid] for pid, e in evidence.items()
                           if e.get("how") == "kept" and e["from"] == source and pid in older and pid not in solved})
        if easy_only:
            rates = ({pid: e["c"] / e["n"] for pid, e in evidence.items() if e["n"]} if evidence
                     else ledger.pass_rates(latest))
            solved = {pid: texts for pid, texts in solved.items()
                      if pid in rates and self.ctx.bands.bucket(rates[pid]) == "easy"}
        return solved

    def enter(self, pos: int, runner_state: Optional[dict]) -> None:
        spec = self.specs[pos]
        selection = self.selection(spec)
        carried = carried_steps(self.specs, spec, self.ctx.completed())
        if carried:  # steps earlier phases with `passes` left unused
            self.ctx.log(f"phase {spec.name}: {spec.steps} steps + {carried} carried from earlier phases")
            spec = replace(spec, steps=spec.steps + carried)
        runner = runner_class(spec.kind)(self.ctx, spec, selection)
        if runner_state is not None:
            runner.load_state_dict(runner_state)
        counts = ", ".join(f"{k} {len(v)}" for k, v in selection.buckets.items())
        replayed, uses_pool = len(selection.replay), runner.traits.uses_pool
        self.ctx.log(f"phase {spec.name}: {spec.kind}" + ("" if not uses_pool else
                     f" on {spec.select} ({len(selection.selected) - replayed} problems"
                     + (f" + {replayed} replayed" if replayed else ""))
                     + (f"; buckets: {counts}" if counts else "") + ("" if not uses_pool else ")")
                     + (f", resuming at step {runner.position}" if runner_state else ""))
        self.pos, self.runner = pos, runner
        self.phase_started = time.time()

    # --------------------------------------------------------------- phase boundaries
    def evaluate(self, label: str) -> None:
        """Held-out evaluation on rank 0 (the others wait)."""
        if dist.is_main():
            self.columns[label] = self.ctx.heldout.evaluate(label)
        dist.barrier()

    def on_train_start(self, trainer, pl_module) -> None:
        ctx = self.ctx
        if ctx.cfg.eval.before and "before" not in self.columns:
            self.evaluate("before")
        for spec in self.specs[:max(0, self.pos)]:  # a resumed run shows the phases it did not rerun
            if ctx.rundir.eval_file(spec.name).is_file():
                self.evaluate(spec.name)
        self.gating.grade_before()
        if self._resumed is None:
            self.gating.snapshot(self.runner.spec)
        self.runner.start(pl_module, resumed=self._resumed is not None)
        relabel_progress(trainer, f"phase {self.runner.spec.name}")

    def on_train_end(self, trainer, pl_module) -> None:
        """The stream has ended: every phase has run. Close the last one and write the final checkpoint."""
        self.close_phase(pl_module, last=True)
        self.save(trainer)
        self.gating.prune(None)
        # what this rank trained on, phase by phase: every rank must have seen the same routing
        digests = {name: hashlib.sha256(json.dumps(d["selected"]).encode()).hexdigest()[:16]
                   for name, d in self.decisions.items()}
        digests["final weights"] = weights_digest(pl_module.policy)
        atomic_write(self.ctx.rundir / "routing" / "ranks" / f"rank-{dist.rank()}.json", json.dumps(digests, indent=1))

    def close_phase(self, module, last: bool = False) -> None:
        """Close the current phase: summary, export, evaluation, state.json (the run's own end is ``Run.finish``)."""
        from stagewise_pl.models.export import save_policy

        runner, ctx = self.runner, self.ctx
        spec, traits = runner.spec, runner.traits
        summary = dict(runner.summary(), seconds=round(time.time() - self.phase_started, 1))
        extra = runner.record()  # what the phase adds to its routing decision (a profile: its evidence)
        if extra:
            self.add_to_decision(spec, extra)
        summary["select"] = spec.select
        if spec.select != "all":
            summary["buckets"] = self.decisions[spec.name]["counts"]
        trained = traits.trains and runner.position > 0
        if not runner.problems and traits.uses_pool:
            summary["skipped"] = f"bucket {spec.select!r} is empty"
        if trained and dist.is_main() and ctx.cfg.run.keep == "all":
            save_policy(ctx.policy, ctx.tokenizer, ctx.rundir.export_dir(spec.name), ctx.renderer.system_prompt)
        if not traits.uses_pool or (trained and ctx.cfg.eval.each_phase):
            self.evaluate(spec.name)
        gate = self.gating.close(spec, self.decisions, summary, last) if trained else None
        if gate is not None:  # the phase's routing decision records what the gate did
            self.add_to_decision(spec, {"gate": gate})
            ctx.log(f"phase {spec.name}: gate {gate['gate']}: {gate['action']} ({gate['reason']}; development "
                    f"accuracy {gate['before']:.3f} after {gate['against']} -> {gate['after']:.3f})")
            if gate["action"] == "retry":
                self.add_to_decision(self.add_retry(self.specs[self.pos]), {})
        if dist.is_main():
            curves = runner.curves()
            if curves:
                atomic_write(ctx.rundir.phase_file("curves", spec.number, spec.name), json.dumps(curves))
            ctx.rundir.mark_completed(spec.name, summary)
        dist.barrier()
        ctx.log(f"phase {spec.name} done: {runner.brief(summary)}")  # every figure: state.json's "completed"
        if spec.name in self.columns:
            ctx.log(ctx.heldout.accuracy_line(spec.name, self.columns[spec.name]))
        fault_point(f"phase_end:{spec.name}")

    def add_to_decision(self, spec: PhaseSpec, extra: dict) -> None:
        """Add ``extra`` to the phase's routing decision, and write it to routing/NN-<phase>.json (rank 0)."""
        self.decisions[spec.name] = {**self.decisions[spec.name], **extra}
        if dist.is_main():
            atomic_write(self.ctx.rundir.phase_file("routing", spec.number, spec.name),
                         json.dumps(self.decisions[spec.name], indent=1))

    def save(self, trainer) -> None:
        """``last.ckpt``: written aside, its digest recorded, then renamed into place (see
        :mod:`stagewise_pl.checkpoints`): a kill never leaves half a checkpoint under a name a resume reads.
        A failed write or rename (disk full, read-only) stops the run with the file named; the checkpoint
        before it is left as it was."""
        directory = self.ctx.rundir.checkpoints
        tmp = directory / f".{checkpoints.LAST}.tmp-{os.getpid()}"
        error = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(tmp))
            fault_point("checkpoint_write")
            if dist.is_main():
                checkpoints.install(directory, tmp, fault_point)
        except OSError as exc:
            error = f"cannot write the checkpoint {directory / checkpoints.LAST}: {exc}"
            if dist.is_main():
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
                if (directory / checkpoints.LAST).is_file():
                    error += f"; {directory / checkpoints.LAST} still holds the checkpoint before it"
        if dist.world_size() > 1:
            error = next((e for e in dist.gather(error) if e), None)  # every rank stops alike
        if error:
            raise checkpoints.CheckpointError(error)


def weights_digest(policy: torch.nn.Module) -> str:
    """A digest of every parameter and buffer, bit for bit."""
    weights = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        weights.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return weights.hexdigest()[:16]


def rng_states() -> dict:
    """torch, numpy and python RNG states as plain types and tensors (a weights-only load reads them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)],
            "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))

