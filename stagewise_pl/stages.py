"""The stage manager: one Lightning fit runs the whole plan, phase after phase, on one strategy.

Pieces:

- :class:`StageRule` — a plug-in (a Lightning ``Callback`` named by dotted path in ``stages.rules``)
  whose ``route(view, buckets)`` reads the difficulty ledger and the pool and returns buckets of
  problem ids. Rules run in order, each seeing the buckets of the ones before it. The built-in
  rules live in the top-level ``callbacks/`` package.
- Phase runners (:mod:`stagewise_pl.runners`), registered by kind in ``PHASES``: what one step of a
  phase does, its budget, its optimiser and its state for checkpoints.
- :class:`StagewiseModule` — the one LightningModule of the run: it holds the policy and hands
  each training step to the current phase's runner (manual optimisation throughout).
- :class:`StageManager` — the callback that runs the plan. The training "data" is a stream of
  tokens ``(phase position, step)``; the step that receives the first token of the next phase
  first closes the current one (summary, export, evaluation, ``state.json``), asks the rules,
  builds the next runner and its optimiser, and writes a checkpoint. The process group and the
  in-memory policy persist: no relaunch and no reload from disk between phases.

Checkpoints (``<run>/checkpoints/last.ckpt``, written to a temporary file and renamed) hold the
model, the phase's optimiser and schedule, and the manager's state: the phase position, the step
in the phase, the runner's state, every routing decision so far, the ledger position and the RNG
states. A run killed at any point and resumed with ``resume=last`` continues in the same phase at
the same step and ends with the weights and ledger of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stagewise_pl import checkpoints, dist
from stagewise_pl.config import ConfigError
from stagewise_pl.faults import fault_point
from stagewise_pl.plan import PhaseSpec
from stagewise_pl.preempt import Preempted
from stagewise_pl.runners import PHASES, PhaseRunner  # noqa: F401  (PHASES: the phase kinds, re-exported)



# ---------------------------------------------------------------------------------------------- rules
@dataclass
class RoutingView:
    """What a stage rule sees at a phase boundary."""

    ledger: Any  # the run's DifficultyLedger
    pool: dict  # problem id -> Problem: the gradable training pool
    done: list  # PhaseSpec of the phases already run, in order
    phase: PhaseSpec  # the phase about to start

    def last(self, kind: str) -> Optional[PhaseSpec]:
        """The most recent finished phase of ``kind``."""
        for spec in reversed(self.done):
            if spec.kind == kind:
                return spec
        return None

    def phases(self, kind: str) -> list[PhaseSpec]:
        return [spec for spec in self.done if spec.kind == kind]

    def pass_rates(self, phase: PhaseSpec) -> dict[str, float]:
        """Pool problem id -> pass rate in ``phase`` (problems it graded)."""
        return {pid: rate for pid, rate in self.ledger.pass_rates(phase.name).items() if pid in self.pool}


class StageRule(L.Callback):
    """Base class of stage rules. ``buckets``: the names it builds; ``reads``: the phase kind it reads."""

    name: str = ""
    buckets: tuple[str, ...] = ()
    reads: Optional[str] = None

    def route(self, view: RoutingView, buckets: dict[str, list[str]]) -> dict[str, list[str]]:
        raise NotImplementedError


def route(rules: Sequence, view: RoutingView) -> dict[str, list[str]]:
    """Apply the rules in order; every bucket is a sorted list of pool problem ids."""
    buckets: dict[str, list[str]] = {}
    for rule in rules:
        out = rule.route(view, {k: list(v) for k, v in buckets.items()})
        if not isinstance(out, dict) or not all(isinstance(v, (list, tuple, set)) for v in out.values()):
            raise TypeError(f"stage rule {rule_name(rule)} must return a dict of bucket -> problem ids, got {out!r}")
        unknown = sorted({pid for ids in out.values() for pid in ids if pid not in view.pool})
        if unknown:
            raise ValueError(f"stage rule {rule_name(rule)} routed ids that are not in the pool: {unknown[:5]}")
        buckets = {str(k): sorted(set(v)) for k, v in out.items()}
    return buckets


def rule_name(rule) -> str:
    return getattr(rule, "name", "") or type(rule).__name__


def selector_rule(path: str):
    """The rule a phase's ``select`` names by dotted path (built with no arguments)."""
    from stagewise_pl.registry import import_dotted

    try:
        rule = import_dotted(path)()
    except (ImportError, TypeError) as exc:
        raise ConfigError(f"select={path!r}: {exc}") from None
    if not callable(getattr(rule, "route", None)):
        raise ConfigError(f"select={path!r} is not a stage rule (no route(view, buckets) method)")
    return rule


def make_rules(configs) -> list:
    """Instantiate ``stages.rules`` (dotted paths); errors name the rule's key."""
    from stagewise_pl.registry import import_dotted

    rules = []
    for i, rc in enumerate(configs):
        try:
            cls = import_dotted(rc.target)
        except ImportError as exc:
            raise ConfigError(f"stages.rules.{i}.target: {exc}") from None
        try:
            rule = cls(**rc.args)
        except TypeError as exc:
            raise ConfigError(f"stages.rules.{i}.args: {rc.target}: {exc}") from None
        if not callable(getattr(rule, "route", None)) or not isinstance(rule, L.Callback):
            raise ConfigError(f"stages.rules.{i}.target: {rc.target} is not a stage rule (a Lightning Callback with "
                              f"a route(view, buckets) method)")
        rules.append(rule)
    return rules


# ---------------------------------------------------------------------------------------------- module
class StagewiseModule(L.LightningModule):
    """The policy, trained by whichever phase runner is current (manual optimisation)."""

    def __init__(self, policy: torch.nn.Module, manager: "StageManager"):
        super().__init__()
        self.policy = policy
        self.automatic_optimization = False
        self.__dict__["_manager"] = manager  # not a submodule

    def training_step(self, token, batch_idx: int):
        self._manager.step(self, token)

    def configure_optimizers(self):
        return self._manager.configure_optimizers(self)

    def log_row(self, row: dict, every: int = 1) -> None:
        """Metrics straight to the loggers (one call per row)."""
        if self.global_step % max(1, every) == 0:
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)

    def bar(self, name: str, value: float) -> None:
        if self.trainer.progress_bar_callback is not None:
            self.log(name, value, prog_bar=True, logger=False, batch_size=1)


class PlanTokens:
    """The stream Lightning trains on: ``(phase position, step)`` for every step the plan will take.

    Lightning fetches one token ahead of the step it trains. A phase's length is known only once
    the phase has started (its bucket is routed at that moment), so for a phase not yet started the
    stream offers its next step and the runner ignores a step beyond its budget."""

    def __init__(self, manager: "StageManager"):
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


# ---------------------------------------------------------------------------------------------- manager
class StageManager(L.Callback):
    """Runs the plan inside one Lightning fit; its state is in every checkpoint."""

    def __init__(self, run, specs: Sequence[PhaseSpec], rules: Sequence, fingerprint: str = ""):
        self.run, self.specs, self.rules, self.fingerprint = run, list(specs), list(rules), fingerprint
        self.pos = -1  # the current phase (index into specs); -1 = not started
        self.runner: Optional[PhaseRunner] = None
        self.decisions: dict[str, dict] = {}
        self._resumed: Optional[dict] = None  # state loaded from a checkpoint, applied when the runner exists
        self.columns: dict = {}  # evaluation label -> results

    @property
    def state_key(self) -> str:
        return "StageManager"

    # --------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        return {"phase": self.pos, "runner": self.runner.state_dict() if self.runner else None,
                "decisions": self.decisions, "ledger": self.run.ledger.state_dict(),
                "fingerprint": self.fingerprint, "rng": rng_states()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint and not self.run.cfg.run.force:
            raise ConfigError(f"resume: the checkpoint was written by another plan or other training data "
                              f"(fingerprint {state.get('fingerprint')} != {self.fingerprint}); pass run.force=true to "
                              f"resume anyway")
        if dist.is_main():
            self.run.ledger.load_state_dict(state["ledger"])  # parts written after the checkpoint are redone
        dist.barrier()
        self.run.ledger.refresh()
        self.decisions = dict(state["decisions"])
        self._resumed = state
        set_rng_states(state["rng"])

    # --------------------------------------------------------------- the plan
    def may_have(self, pos: int, step: int) -> bool:
        if pos < self.pos:
            return False
        if pos > self.pos or self.runner is None:
            return True  # not started: its length is not known yet
        return self.runner.has_step(step)

    def configure_optimizers(self, module: StagewiseModule):
        """Called by Lightning once at set-up (after a checkpoint's callback state is restored)."""
        if self.runner is None:
            resumed = self._resumed
            self.enter(module, resumed["phase"] if resumed else 0, resumed["runner"] if resumed else None)
        return self.runner.configure_optimizers(module)

    def step(self, module: StagewiseModule, token) -> None:
        pos, step = token
        if pos != self.pos:
            self.finish(module)
            self.enter(module, pos, None)
            trainer = module.trainer
            trainer.strategy.setup_optimizers(trainer)
            # Lightning counts optimizer steps through hooks it puts on the optimizers at the start of each
            # batch: the optimizer built within this batch needs them now
            trainer.fit_loop.epoch_loop.manual_optimization.on_run_start()
            self.runner.start(module, resumed=False)
            self.save(module.trainer)
        runner, saved = self.runner, False
        if step == runner.position and not runner.done():  # else a step beyond the phase's budget (offered
            runner.step(module, step)                      # before the phase knew it): nothing to do
            fault_point(f"step:{runner.spec.name}:{runner.position}")
            if runner.position % self.run.cfg.trainer.checkpoint_every_n_steps == 0:
                self.save(module.trainer)
                saved = True
                fault_point(f"checkpoint:{runner.spec.name}:{runner.position}")
        signum = self.stop_requested()
        if signum is not None:  # SIGUSR1 / SIGTERM / Ctrl-C: this step is kept, then the run stops
            if not saved:
                self.save(module.trainer)
            raise Preempted(signum, f"phase {runner.spec.name} step {runner.position}",
                            str(self.run.dir / "checkpoints" / "last.ckpt"))

    def stop_requested(self) -> Optional[int]:
        """The signal that asks the run to stop (see :mod:`stagewise_pl.preempt`), agreed by every rank."""
        watch = getattr(self.run, "signals", None)
        mine = watch.signum if watch is not None else None
        if dist.world_size() == 1:
            return mine
        return next((s for s in dist.gather(mine) if s is not None), None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Lightning stops on SIGTERM at a batch boundary of its own (a signal that came after this step's
        check): the state is whole there, so it is checkpointed before the run exits."""
        if isinstance(exception, SIGTERMException) and self.runner is not None:
            self.save(trainer)

    def select(self, spec: PhaseSpec) -> list:
        """The phase's problems: its bucket (asking the rules) or the pool, then its kind's level filter and limit."""
        from stagewise_pl.verify.gold import gradable

        run = self.run
        pool = gradable(run.pool)
        if spec.name in self.decisions:  # decided before a checkpoint: the same problems again
            ids = self.decisions[spec.name]["selected"]
        else:
            decision = None
            if dist.is_main():
                decision = self.decide(spec, pool)
            decision = dist.broadcast(decision)
            if decision.get("error"):  # raised on every rank alike
                raise ConfigError(decision["error"])
            self.decisions[spec.name] = decision
            ids = decision["selected"]
        by_id = {p.id: p for p in (pool if spec.kind != "sft" else run.pool)}
        return [by_id[i] for i in ids]

    def decide(self, spec: PhaseSpec, pool: list) -> dict:
        run, cfg = self.run, self.run.cfg
        if spec.kind == "eval":  # held-out sets, not the training pool
            candidates, buckets, counts = [], {}, {}
        elif spec.select == "all":
            candidates = run.pool if spec.kind == "sft" else pool
            buckets, counts = {}, {}
        else:
            view = RoutingView(run.ledger, {p.id: p for p in pool}, self.specs[:spec.index - 1], spec)
            buckets, chosen = self.bucket(spec.select, view)
            if not chosen and spec.fallback:  # the selected bucket is empty: the phase's fallback bucket
                run.log(f"phase {spec.name}: bucket {spec.select!r} is empty; falling back to {spec.fallback!r}")
                more, chosen = self.bucket(spec.fallback, view)
                buckets = {**buckets, **more}
            counts = {name: len(ids) for name, ids in buckets.items()}
            candidates = [p for p in (run.pool if spec.kind == "sft" else pool) if p.id in chosen]
        levels = {"grpo": cfg.grpo.levels, "profile": cfg.profile.levels}.get(spec.kind) or []
        error = None
        if levels:
            kept = [p for p in candidates if str(p.level) in {str(v) for v in levels}]
            if candidates and not kept:
                error = f"{spec.kind}.levels={list(levels)}: none of the {len(candidates)} problems phase {spec.name} " \
                        f"selected ({spec.select}) is at these levels"
            candidates = kept
        limit = spec.limit or (cfg.profile.limit if spec.kind == "profile" else 0)
        if limit and limit < len(candidates):
            # seeded by the run alone: profiles with the same limit see the same problems, before and after training
            keep = np.random.default_rng([cfg.run.seed]).choice(len(candidates), limit, replace=False)
            candidates = [candidates[i] for i in sorted(keep)]
        replay: list = []
        own: dict[str, str] = {}
        if spec.replay > 0 and candidates:
            chosen = {p.id for p in candidates}
            rest = [p for p in (run.pool if spec.kind == "sft" else pool) if p.id not in chosen]
            if cfg.data.replay_target == "own":  # problems the latest profile saw solved, with one of their solutions
                solved = self.own_solutions(spec)
                if not solved:
                    run.log(f"phase {spec.name}: data.replay_target=own, but no earlier profile solved a problem: "
                            f"no replay")
                rest = [p for p in rest if p.id in solved]
            count = min(len(rest), round(len(candidates) * spec.replay / (1.0 - spec.replay)))
            if count:
                keep = np.random.default_rng([cfg.run.seed, spec.index, 1]).choice(len(rest), count, replace=False)
                replay = [rest[i] for i in sorted(keep)]
                if cfg.data.replay_target == "own":
                    rng = np.random.default_rng([cfg.run.seed, spec.index, 2])
                    own = {p.id: solved[p.id][int(rng.integers(len(solved[p.id])))] for p in replay}
        decision = {"phase": spec.name, "kind": spec.kind, "select": spec.select, "replay": [p.id for p in replay],
                    **({"replay_targets": own} if own else {}),
                    "rules": [rule_name(r) for r in self.rules] if spec.select != "all" else [],
                    "counts": counts, "ids": buckets, "selected": [p.id for p in candidates + replay], "error": error}
        path = run.dir / "routing" / f"{spec.index:02d}-{spec.name}.json"
        from stagewise_pl.run import atomic_write

        atomic_write(path, json.dumps(decision, indent=1))
        return decision

    def bucket(self, select: str, view: RoutingView) -> tuple[dict, set]:
        """The buckets the rules build and the ids ``select`` names: a bucket, or a rule by dotted path (run after
        the configured ones: the buckets it builds)."""
        if ":" in select:
            rule = selector_rule(select)
            before = route(self.rules, view)
            buckets = route(self.rules + [rule], view)
            names = getattr(rule, "buckets", ()) or [k for k in buckets if buckets[k] != before.get(k)]
            return buckets, {pid for name in names for pid in buckets.get(name, [])}
        buckets = route(self.rules, view)
        return buckets, set(buckets.get(select, []))

    def own_solutions(self, spec: PhaseSpec) -> dict[str, list[str]]:
        """Problem id -> the student's correct completions in the latest profile before ``spec`` ({} if none)."""
        profiles = [s for s in self.specs[:spec.index - 1] if s.kind == "profile"]
        return self.run.ledger.correct_by_problem(profiles[-1].name) if profiles else {}

    def enter(self, module: StagewiseModule, pos: int, runner_state: Optional[dict]) -> None:
        spec = self.specs[pos]
        problems = self.select(spec)
        decision = self.decisions[spec.name]
        counts = ", ".join(f"{k} {v}" for k, v in decision["counts"].items())
        runner = PHASES.get(spec.kind)(self, spec, problems)
        if runner_state is not None:
            runner.load_state_dict(runner_state)
        replayed = len(decision.get("replay", []))
        self.run.log(f"phase {spec.name}: {spec.kind}" + ("" if spec.kind == "eval" else
                     f" on {spec.select} ({len(problems) - replayed} problems"
                     + (f" + {replayed} replayed" if replayed else ""))
                     + (f"; buckets: {counts}" if counts else "") + ("" if spec.kind == "eval" else ")")
                     + (f", resuming at step {runner.position}" if runner_state else ""))
        self.pos, self.runner = pos, runner
        self.phase_started = time.time()

    def evaluate(self, label: str) -> None:
        """Held-out evaluation on rank 0 (the others wait)."""
        if dist.is_main():
            self.columns[label] = self.run.evaluate(label)
        dist.barrier()

    def on_train_start(self, trainer, pl_module) -> None:
        if self.run.cfg.eval.before and "before" not in self.columns:
            self.evaluate("before")
        for spec in self.specs[:max(0, self.pos)]:  # a resumed run shows the phases it did not rerun
            if (self.run.dir / "eval" / f"{spec.name}.json").is_file():
                self.evaluate(spec.name)
        self.runner.start(pl_module, resumed=self._resumed is not None)

    def on_train_end(self, trainer, pl_module) -> None:
        """The stream has ended: every phase has run. Close the last one and write the final checkpoint."""
        self.finish(pl_module)
        self.save(trainer)
        # what this rank trained on, phase by phase: every rank must have seen the same routing
        from stagewise_pl.run import atomic_write

        digests = {name: hashlib.sha256(json.dumps(d["selected"]).encode()).hexdigest()[:16]
                   for name, d in self.decisions.items()}
        weights = hashlib.sha256()
        for name, tensor in sorted(pl_module.policy.state_dict().items()):
            weights.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests["final weights"] = weights.hexdigest()[:16]
        atomic_write(self.run.dir / "routing" / "ranks" / f"rank-{dist.rank()}.json", json.dumps(digests, indent=1))

    def finish(self, module: StagewiseModule) -> None:
        """Close the current phase: summary, export, evaluation, state.json."""
        runner, run = self.runner, self.run
        spec = runner.spec
        summary = dict(runner.summary(), seconds=round(time.time() - self.phase_started, 1))
        summary["select"] = spec.select
        if spec.select != "all":
            summary["buckets"] = self.decisions[spec.name]["counts"]
        trained = runner.trains and runner.position > 0
        if not runner.problems and spec.kind != "eval":
            summary["skipped"] = f"bucket {spec.select!r} is empty"
        if trained and dist.is_main():
            run.export(run.dir / "export" / spec.name)
        if spec.kind == "eval" or (trained and run.cfg.eval.each_phase):
            self.evaluate(spec.name)
        if dist.is_main():
            curves = runner.curves()
            if curves:
                from stagewise_pl.run import atomic_write

                atomic_write(run.dir / "curves" / f"{spec.index:02d}-{spec.name}.json", json.dumps(curves))
            run.mark_completed(spec.name, summary)
        dist.barrier()
        run.log(f"phase {spec.name} done: {json.dumps(summary)}")
        if spec.name in self.columns:
            run.log(run.accuracy_line(spec.name, self.columns[spec.name]))
        fault_point(f"phase_end:{spec.name}")

    def save(self, trainer) -> None:
        """``last.ckpt``: written aside, its digest recorded, then renamed into place (see
        :mod:`stagewise_pl.checkpoints`): a kill never leaves half a checkpoint under a name a resume reads.
        A failed write or rename (disk full, read-only) stops the run with the file named; the checkpoint
        before it is left as it was."""
        directory = self.run.dir / "checkpoints"
        tmp = directory / f".last.ckpt.tmp-{os.getpid()}"
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
