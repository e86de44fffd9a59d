"""One run: its directory, its checked plan, its set-up, and the one Lightning fit of the whole plan.

:class:`Run` checks everything it can before any slow work (the plan, the rules, the teacher, the resume point),
loads the pool, the policy, the verifier and the ledger, builds the :class:`~stagewise_pl.phases.PhaseContext`
that the phase manager and every runner work with, and runs the plan in one fit
(:mod:`stagewise_pl.phases.manager`). The layout of a run directory: :mod:`stagewise_pl.rundir`.

``resume=last`` continues from ``checkpoints/last.ckpt`` in the same phase at the same step. Resuming a finished
run does nothing and says so; a changed plan, configuration or training data is refused unless ``run.force=true``;
a run written by an earlier format of the run directory is refused with the reason.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

from stagewise_pl import dist
from stagewise_pl.config import Config, ConfigError, resolve_run_dir, to_yaml
from stagewise_pl.io import atomic_write
from stagewise_pl.preflight import check_teaching, flat, plan_phases, plan_traits, pool_digest
from stagewise_pl.rundir import FORMAT, RunDir

# Keys that may differ between the original run and a resumed one.
RESUME_FREE_KEYS = {"run.resume", "run.progress_bar", "run.threads", "run.dir", "run.force", "run.requeue",
                    "run.checkpoint_fallback", "run.keep", "model.cache_dir"}  # caches are keyed by content
RUN_DIR_ENV = "STAGEWISE_RUN_DIR"  # the run directory, for the processes a DDP launch starts


def say(*args, **kwargs) -> None:
    """print, flushed: a run's lines reach a Slurm log file as they happen."""
    print(*args, **kwargs, flush=True)


class Run:
    def __init__(self, cfg: Config, log=say):
        from stagewise_pl.models.packaged import gguf_path, is_packaged
        from stagewise_pl.routing import make_rules, selector_rule

        self.cfg = cfg
        self.log = log if dist.is_main() else (lambda *args, **kwargs: None)  # one voice under DDP
        self.rules = make_rules(cfg.routing.rules)
        self.phases = plan_phases(cfg, self.rules)
        self.traits = plan_traits(self.phases)
        for i, spec in enumerate(self.phases):  # a rule named as a selector must import before any work
            if ":" in spec.select:
                try:
                    selector_rule(spec.select)
                except ConfigError as exc:
                    raise ConfigError(f"phases.{i}.{exc}") from None
        if is_packaged(cfg.model.name_or_path):
            gguf_path(cfg.model.name_or_path)  # a missing GGUF stops here, before the run directory or any set-up
        self.dir = self._locate_dir()
        self.rundir = RunDir(self.dir)
        os.environ[RUN_DIR_ENV] = str(self.dir)
        self.callbacks: list = []  # further Lightning callbacks (tests add theirs)
        self.ctx = None  # the PhaseContext, once set up
        self.manager = None
        self.signals = None
        self.prompts = check_teaching(cfg, self.phases)

    def rate_key(self):
        """How the rules (and the plan's selector rules) that read profiles classify a pass rate, for sequential
        profiles (stagewise_pl.routing.evidence)."""
        from stagewise_pl.routing import selector_rule
        from stagewise_pl.routing.evidence import rate_key

        selectors = [selector_rule(s.select) for s in self.phases if ":" in s.select]
        key, why = rate_key([*self.rules, *selectors])
        pc = self.cfg.profile
        if key is None and pc.sequential and any(s.kind == "profile" for s in self.phases):
            self.log(f"profile.sequential: {why}; profiles take all k={pc.k} samples")
        return key

    # ------------------------------------------------------------------ layout
    def _locate_dir(self) -> Path:
        cfg = self.cfg
        resume = cfg.run.resume
        if os.environ.get(RUN_DIR_ENV) and not dist.is_main():
            return Path(os.environ[RUN_DIR_ENV])  # a process started by a DDP launch: rank 0's run
        if resume and resume not in ("last", "restart"):
            ckpt = Path(resume).expanduser()
            if not ckpt.is_file():
                raise ConfigError(f"resume={resume}: no such checkpoint file")
            return ckpt.parent.parent  # <run>/checkpoints/<file>.ckpt
        if resume in ("last", "restart") and not cfg.run.dir:
            candidates = sorted(Path("runs").glob(f"{cfg.conf_name}-*"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise ConfigError(f"resume={resume}: no run.dir given and no runs/{cfg.conf_name}-* directory "
                                  f"to resume")
            self.log(f"resume={resume}: the newest run, {candidates[-1]}")
            return candidates[-1]
        directory = resolve_run_dir(cfg)
        if resume in ("last", "restart"):
            if not (directory / "config.yaml").is_file():
                raise ConfigError(f"resume={resume}: {directory} holds no run (no config.yaml); nothing to resume")
        elif (directory / "state.json").exists():
            raise ConfigError(f"run.dir={directory} already holds a run; pass resume=last to continue it "
                              f"or choose another run.dir")
        return directory

    def check_format(self) -> None:
        """A run directory written by an earlier version of the run's format cannot be continued by this one."""
        state = self.rundir.state()
        if (self.dir / "state.json").is_file() and state.get("format") != FORMAT:
            raise ConfigError(f"resume: {self.dir} was written by an earlier version of stagewise_pl (run format "
                              f"{state.get('format', 1)}; this version reads format {FORMAT}: phases and routing "
                              f"were redesigned and checkpoints hold their state differently). Finish it with the "
                              f"version that started it (git checkout d6672e7), or start a new run.dir")

    def _check_resumed_config(self) -> None:
        from omegaconf import OmegaConf

        stored = OmegaConf.to_container(OmegaConf.load(self.dir / "config.yaml"))
        current = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        a, b = flat(stored), flat(current)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_FREE_KEYS)
        if changed and self.cfg.run.force:
            self.log(f"resume: run.force=true: continuing although the configuration differs at {', '.join(changed)}")
        elif changed:
            raise ConfigError(f"resume: the configuration differs from the one {self.dir} was started with, at "
                              f"{', '.join(changed)}; resume with the same settings, start a new run.dir, or pass "
                              f"run.force=true")

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Pool, policy, verifier, ledger, teachers and evaluation: the phase context of the run."""
        import lightning as L
        import torch

        from stagewise_pl.buckets import bands_of
        from stagewise_pl.data.loaders import load_pool
        from stagewise_pl.eval.heldout import HeldOutEvaluation
        from stagewise_pl.ledger import DifficultyLedger
        from stagewise_pl.logging import make_logger
        from stagewise_pl.models.load import PromptRenderer, load_policy
        from stagewise_pl.phases import PhaseContext, RolloutEngines, Teachers
        from stagewise_pl.tasks.arithmetic import ArithmeticTask
        from stagewise_pl.verify import make_verifier

        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            atomic_write(self.dir / "config.yaml", to_yaml(cfg))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        L.seed_everything(cfg.run.seed, workers=True, verbose=False)
        task = ArithmeticTask.from_config(cfg.task)
        pool, report = load_pool(cfg.data, task)
        self.log(f"training pool: {report.summary()}")
        verifier = make_verifier(cfg.verifier)
        self._check_golds(verifier, pool, "training pool")
        if dist.is_main():
            self._keep_previous_csv()
        logger = make_logger(cfg.run.logger, self.dir)
        base = self.base_model_path(task)
        policy, tokenizer = load_policy(base, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.hub_kernels)
        renderer = PromptRenderer(tokenizer, cfg.model.system_prompt)
        pool = self._drop_too_long(pool, report, policy, tokenizer, renderer)
        pool, dev_problems = self._carve_dev(pool)
        if cfg.model.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora_rank:
            from stagewise_pl.models.lora import apply_lora

            m = cfg.model
            trainable = apply_lora(policy, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
            self.log(f"LoRA rank {m.lora_rank} on {', '.join(m.lora_targets)}: {trainable} trainable parameters")
        ledger = DifficultyLedger(self.rundir.ledger, run_id=self.dir.name, writer=dist.is_main())
        self.data_digest = pool_digest(pool)
        engines = RolloutEngines(cfg, policy, tokenizer, lambda: base, [p.prompt for p in pool[:4]], self.log,
                                 record_dir=self.rundir.path)
        bands = bands_of(self.rules)
        heldout = HeldOutEvaluation(cfg, task, verifier, renderer, engines.for_evaluation, self.rundir,
                                    lambda problems, label: self._check_golds(verifier, problems, label), logger, bands)
        self.logger = logger
        self.ctx = PhaseContext(cfg, policy, tokenizer, plan=self.phases, traits=self.traits, pool=pool,
                                verifier=verifier, engines=engines, teachers=Teachers(cfg, task, self.prompts),
                                ledger=ledger, rundir=self.rundir, task=task, prompts=self.prompts, bands=bands,
                                heldout=heldout, log=self.log, signals=self.signals, rate_key=self.rate_key(),
                                renderer=renderer)
        if dev_problems:
            from stagewise_pl.phases.dev import DevSplit

            self.ctx.dev = DevSplit(dev_problems, cfg.data.dev_k, cfg.eval.temperature, self.ctx.max_new_tokens(),
                                    cfg.run.seed, verifier, renderer, engines.for_evaluation, self.rundir)
        if self.prompts:  # phases that use the teacher: one that cannot be built stops the run now, not hours in
            from stagewise_pl.teachers import TeacherError

            try:
                self.ctx.teachers.teacher(), self.ctx.teachers.critic()
            except TeacherError as exc:
                raise ConfigError(f"teacher: {exc}") from None

    def _carve_dev(self, pool: list) -> tuple[list, list]:
        """The training pool without the development split (data.dev_size), and the split."""
        from stagewise_pl.phases.dev import carve_dev

        try:
            pool, dev = carve_dev(pool, self.cfg.data.dev_size, self.cfg.run.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if dev:
            self.log(f"development split: {len(dev)} problems (data.dev_size), never trained on or profiled; "
                     f"{len(pool)} left in the training pool")
        return pool, dev

    def _drop_too_long(self, pool, report, policy, tokenizer, render) -> list:
        """Pool problems whose rendered prompt does not fit the model's context are bad rows (prompt_too_long)."""
        from stagewise_pl.data.loaders import drop_too_long
        context = getattr(policy.config, "max_position_embeddings", None)
        if not context:
            return pool
        before = len(pool)
        pool = drop_too_long(pool, report, lambda p: len(tokenizer(render(p.prompt),
                                                                   add_special_tokens=False).input_ids),
                             context, self.cfg.data.on_bad_row, self.cfg.data.max_bad_fraction)
        if len(pool) < before:
            self.log(f"training pool: {report.summary()}")
        return pool

    def _keep_previous_csv(self) -> None:
        """Lightning's CSV logger deletes an existing metrics.csv: keep an earlier launch's under another name."""
        previous = self.dir / "logs" / "metrics.csv"
        if previous.is_file():
            launch = len(list(previous.parent.glob("metrics.launch-*.csv"))) + 1
            previous.rename(previous.with_name(f"metrics.launch-{launch}.csv"))

    def _check_golds(self, verifier, problems, label: str) -> list:
        """Flag golds the verifier cannot grade; return the gradable problems."""
        from stagewise_pl.verify.gold import flag_ungradable_golds, gradable

        flagged = flag_ungradable_golds(problems, verifier, progress=self.cfg.run.progress_bar)
        if flagged:
            self.log(f"{label}: {sum(flagged.values())} of {len(problems)} gold answers cannot be graded by "
                     f"verifier {self.cfg.verifier.name!r} ({dict(flagged)}); they are left out of evaluation, "
                     f"profiling and RL")
        return gradable(problems)

    def base_model_path(self, task) -> str:
        if self.cfg.model.name_or_path == "tiny":
            from stagewise_pl.phases.warmup import tiny_base_model

            return str(tiny_base_model(self.cfg, task, log=self.log))
        from stagewise_pl.models.packaged import is_packaged, packaged_model

        if is_packaged(self.cfg.model.name_or_path):  # a pip package's GGUF (smollm2-135m), converted once
            return str(packaged_model(self.cfg.model.name_or_path, self.cfg.model.cache_dir, log=self.log))
        return self.cfg.model.name_or_path

    # ------------------------------------------------------------------ the plan
    def choose_checkpoint(self) -> Optional[str]:
        """The checkpoint to continue from: resume=PATH, or the last complete one with resume=last (see
        :mod:`stagewise_pl.checkpoints`); None for a fresh run or resume=restart."""
        from stagewise_pl import checkpoints

        resume, directory = self.cfg.run.resume, self.rundir.checkpoints
        if dist.is_main() and directory.is_dir():
            checkpoints.remove_partial(directory)
        if resume not in ("last", "restart"):
            return str(Path(resume).expanduser()) if resume else None
        chosen = checkpoints.choose(directory, self.cfg.run.checkpoint_fallback, self.log) if directory.is_dir() \
            else None
        if resume == "restart":
            if chosen is not None:
                raise ConfigError(f"resume=restart: {self.dir} has a checkpoint ({chosen}); continue it with "
                                  f"resume=last, or start a new run.dir")
            return None
        if chosen is None:
            raise ConfigError(f"resume=last: {self.dir} has no checkpoint (stopped before its first one); nothing "
                              f"to resume. Start it over with resume=restart")
        return str(chosen)

    def execute(self) -> Path:
        """Run (or continue) the plan in one Lightning fit; returns the run directory. The run directory's lock is
        held throughout (:mod:`stagewise_pl.runlock`: a second launch on it is refused)."""
        from stagewise_pl.runlock import RunLock

        lock = RunLock(self.dir, self.log).acquire() if dist.is_main() else None
        try:
            return self._execute()
        finally:
            if lock is not None:
                lock.release()

    def _execute(self) -> Path:
        if self.cfg.run.resume:
            self._check_resumed_config()
            self.check_format()
            if self.rundir.state().get("finished"):
                self.log(f"resume: {self.dir} has completed every phase; nothing to do")
                return self.dir
        from stagewise_pl.preempt import SignalWatch

        # checked before the slow set-up: a missing or corrupt one stops now
        self.resume_from = self.choose_checkpoint()
        # from here a SIGUSR1 / SIGTERM / Ctrl-C is recorded, and acted on at the end of the next step
        with SignalWatch() as self.signals:
            self.setup()
            try:
                return self._execute_plan()
            finally:
                self.ctx.verifier.close()

    def _check_data(self) -> None:
        state = self.rundir.state()
        if state.get("data") and state["data"] != self.data_digest:
            if not self.cfg.run.force:
                raise ConfigError(f"resume: the training data differs from the data {self.dir} was started with "
                                  f"(digest {self.data_digest} != {state['data']}); pass run.force=true to resume "
                                  f"anyway")
            self.log("resume: run.force=true: continuing although the training data changed")
        import torch

        threads = torch.get_num_threads()  # the order of float sums: another count changes the last bits
        if state.get("threads") and state["threads"] != threads:
            self.log(f"resume: this launch computes with {threads} torch threads, the run started with "
                     f"{state['threads']}: the weights will differ from an uninterrupted run in the last bits "
                     f"(set run.threads={state['threads']} to match)")
        if dist.is_main():
            # the thread count recorded is the first launch's
            self.rundir.update_state(data=self.data_digest, threads=state.get("threads") or threads)

    def _execute_plan(self) -> Path:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from stagewise_pl.phases.driver import StagewiseModule, make_trainer, quiet_fit
        from stagewise_pl.phases.manager import PhaseManager, PlanTokens
        from stagewise_pl.plan import describe, fingerprint
        from stagewise_pl.preempt import Preempted, requeue

        cfg, ctx = self.cfg, self.ctx
        started = time.time()
        self._check_data()
        rules_doc = [{"target": r.target, "args": r.args} for r in cfg.routing.rules]
        manager = PhaseManager(ctx, self.rules, fingerprint(self.phases, rules_doc, self.data_digest))
        self.manager = manager
        ckpt = self.resume_from
        if cfg.run.resume == "restart" and dist.is_main():
            # stopped before its first checkpoint: the run starts over, and so does its record
            self.log(f"resume=restart: starting {self.dir} over (dropping {len(ctx.ledger.parts())} ledger parts)")
            ctx.ledger.load_state_dict({"parts": 0})
            self.rundir.update_state(completed={})
        self.log("plan:\n  " + "\n  ".join(describe(self.phases, self.traits))
                 + (f"\nresuming from {ckpt}" if ckpt else ""))
        trainer = make_trainer(cfg.trainer, cfg.run, logger=self.logger,
                               callbacks=[manager, *self.rules, *self.user_callbacks(), *self.callbacks])
        ctx.policy.train()  # from_pretrained returns it in eval mode
        try:
            quiet_fit(trainer, StagewiseModule(ctx.policy, manager), PlanTokens(manager), ckpt_path=ckpt)
        except (Preempted, SIGTERMException) as exc:
            if not isinstance(exc, Preempted):  # Lightning's own SIGTERM stop (the manager checkpointed)
                exc = Preempted(signal.SIGTERM, "the step in progress", str(manager.last_checkpoint()))
            self.log(str(exc))
            if cfg.run.requeue and dist.is_main():
                requeue(self.log)
            raise exc from None
        if dist.is_main():
            from stagewise_pl.models.export import save_policy

            save_policy(ctx.policy, ctx.tokenizer, self.dir / "final", ctx.renderer.system_prompt)
            self.rundir.update_state(finished=True)
            if cfg.run.keep == "final":  # after "finished": a kill in between leaves a run that says it is done
                shutil.rmtree(self.rundir.checkpoints, ignore_errors=True)
                self.log(f"run.keep=final: removed {self.rundir.checkpoints}")
            self.finish(OrderedDict(manager.columns), time.time() - started)
        dist.barrier()
        return self.dir

    def user_callbacks(self) -> list:
        """``trainer.callbacks``: further Lightning callbacks by dotted path."""
        from stagewise_pl.registry import import_dotted
        from stagewise_pl.routing import translate_path

        out = []
        for i, path in enumerate(self.cfg.trainer.callbacks):
            try:
                out.append(import_dotted(translate_path(path, f"trainer.callbacks.{i}"))())
            except (ImportError, TypeError) as exc:
                raise ConfigError(f"trainer.callbacks.{i}: {exc}") from None
        return out

    def finish(self, columns: "OrderedDict[str, Any]", seconds: float) -> None:
        from stagewise_pl.eval.evaluate import compact_table, format_table

        if self.logger is not None:
            self.logger.finalize("success")
        head = f"conf: {self.cfg.conf_name}, seed {self.cfg.run.seed}, {seconds:.0f} s this launch"
        sections, console = [f"# Run {self.dir.name}\n", head + "\n"], [head]
        if columns:
            first = next(iter(columns.values()))
            for name in first:
                results = OrderedDict((label, res[name]) for label, res in columns.items() if name in res)
                sections.append(f"## {name}: greedy pass@1 and mean sampled pass rate by level\n\n"
                                f"{format_table(results)}\n")
                console.append(f"\n{name}: held-out greedy pass@1 by level\n{compact_table(results)}")
        gated = [(name, s) for name, s in self.rundir.completed().items() if "dev_accuracy" in s]
        if gated:
            sections.append("## The development split after each training phase\n\n| phase | dev accuracy | gate |\n"
                            "|---|---:|---|\n" + "".join(f"| {name} | {s['dev_accuracy']:.3f} | {s.get('gate', '')} |\n"
                                                         for name, s in gated))
        atomic_write(self.dir / "summary.md", "\n".join(sections))
        # the console gets the narrow table; summary.md keeps the wide one (mean p and buckets per phase)
        self.log("\n" + "\n".join(console))
        self.log(f"run directory: {self.dir} (tables with mean pass rates and buckets: summary.md; phase "
                 f"summaries: state.json)")
