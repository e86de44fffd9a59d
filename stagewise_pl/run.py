"""One run: its directory, its policy, its plan of phases, evaluation and resume.

Layout of a run directory::

    config.yaml            the resolved configuration
    state.json             phases completed (written atomically after each phase)
    checkpoints/last.ckpt  the latest Lightning checkpoint (model, optimiser, stage manager state);
                           previous.ckpt the one before; digests.json their sha256 (stagewise_pl.checkpoints)
    curves/NN-<phase>.json per-step series of a training phase (SFT losses; GRPO rewards, losses, ...)
    ledger/                every graded rollout (the difficulty ledger, Parquet parts)
    routing/<phase>.json   what the stage rules decided at each phase boundary
    export/<phase>/        the policy after each training phase (save_pretrained)
    eval/<label>.json      evaluation results (before, and after each phase)
    logs/                  CSV / TensorBoard / W&B logs
    final/                 the last policy (save_pretrained)
    summary.md             the accuracy table

The whole plan runs in one Lightning fit driven by :class:`~stagewise_pl.stages.StageManager`.
``resume=last`` continues from ``checkpoints/last.ckpt`` in the same phase at the same step.
Resuming a finished run does nothing and says so; a changed plan, configuration or training data
is refused unless ``run.force=true``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

from stagewise_pl import dist
from stagewise_pl.config import Config, ConfigError, resolve_run_dir, to_yaml

# Keys that may differ between the original run and a resumed one.
RESUME_FREE_KEYS = {"run.resume", "run.progress_bar", "run.threads", "run.dir", "run.force", "run.requeue",
                    "run.checkpoint_fallback"}
RUN_DIR_ENV = "STAGEWISE_RUN_DIR"  # the run directory, for the processes a DDP launch starts


def plan_phases(cfg: Config, rules=None) -> list:
    """The checked plan (see :func:`stagewise_pl.plan.build_plan`)."""
    from stagewise_pl.plan import build_plan, rule_info
    from stagewise_pl.runners import PHASES
    from stagewise_pl.stages import make_rules

    rules = make_rules(cfg.stages.rules) if rules is None else rules
    return build_plan(cfg.phases, PHASES.names(), [rule_info(r) for r in rules])


def pool_digest(problems) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\x00{p.prompt}\x00{p.answer}\x01".encode())
    return h.hexdigest()[:16]


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(v, dict) for v in d):  # the plan: phases.1.steps
        out = {f"{prefix}length": len(d)}
        for i, v in enumerate(d):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def check_teaching(cfg: Config, phases) -> dict:
    """With bridge_sft or cft phases: the prompt templates (returned), the teacher, the critic and the bridge
    strategy must resolve before any work; {} without such phases."""
    if not any(s.kind in ("bridge_sft", "cft") for s in phases):
        return {}
    from stagewise_pl.bridge import BRIDGES
    from stagewise_pl.config import load_prompts
    from stagewise_pl.teachers import TEACHERS

    prompts = load_prompts(cfg.prompts)
    for key, name in (("teacher.name", cfg.teacher.name), ("teacher.critic", cfg.teacher.critic),
                      ("bridge.strategy", cfg.bridge.strategy)):
        if name:
            try:
                (BRIDGES if key == "bridge.strategy" else TEACHERS).get(name)
            except (KeyError, ImportError) as exc:
                raise ConfigError(f"{key}: {exc.args[0] if exc.args else exc}") from None
    return prompts


def referenced_files(cfg: Config, phases) -> list[tuple[str, Path, bool]]:
    """(what, path, exists) for every file the run will read: the pool, evaluation sets, a trace file."""
    files = []
    if cfg.data.source in ("jsonl", "benchmark"):
        files.append(("data.path", Path(cfg.data.path).expanduser(), Path(cfg.data.path).expanduser().exists()))
    files += [("eval.benchmarks", Path(b).expanduser(), Path(b).expanduser().is_file()) for b in cfg.eval.benchmarks]
    if any(s.kind in ("bridge_sft", "cft") for s in phases):
        for key, name, args in (("teacher.args.path", cfg.teacher.name, cfg.teacher.args),
                                ("teacher.critic_args.path", cfg.teacher.critic, cfg.teacher.critic_args)):
            if name == "trace_file" and args.get("path"):
                files.append((key, Path(args["path"]).expanduser(), Path(args["path"]).expanduser().is_file()))
    return files


def say(*args, **kwargs) -> None:
    """print, flushed: a run's lines reach a Slurm log file as they happen."""
    print(*args, **kwargs, flush=True)


class Run:
    def __init__(self, cfg: Config, log=say):
        from stagewise_pl.stages import make_rules

        self.cfg = cfg
        self.log = log if dist.is_main() else (lambda *args, **kwargs: None)  # one voice under DDP
        self.rules = make_rules(cfg.stages.rules)
        self.phases = plan_phases(cfg, self.rules)
        from stagewise_pl.stages import selector_rule

        for i, spec in enumerate(self.phases):  # a rule named as a selector must import before any work
            if ":" in spec.select:
                try:
                    selector_rule(spec.select)
                except ConfigError as exc:
                    raise ConfigError(f"phases.{i}.{exc}") from None
        if any(p.kind == "grpo" for p in self.phases):
            from stagewise_pl.advantages import ADVANTAGES

            try:
                ADVANTAGES.get(cfg.grpo.advantage)
            except (KeyError, ImportError) as exc:
                raise ConfigError(f"grpo.advantage: {exc.args[0] if exc.args else exc}") from None
        self.dir = self._locate_dir()
        os.environ[RUN_DIR_ENV] = str(self.dir)
        self.callbacks: list = []
        self.ledger = None  # the DifficultyLedger: every graded rollout of the run
        self.policy = self.tokenizer = self.logger = self.task = self.verifier = None
        self.pool: list = []
        self._eval_cache: Optional[list] = None
        self._engine = None
        self._teachers: dict = {}
        self.prompts = check_teaching(cfg, self.phases)

    def teacher(self, critic: bool = False):
        """The configured teacher (``critic``: the one that writes critiques), built once."""
        from stagewise_pl.teachers.base import make_teacher

        t = self.cfg.teacher
        name, args = (t.critic, dict(t.critic_args)) if critic and t.critic else (t.name, dict(t.args))
        if name not in self._teachers:
            cache = Path(self.cfg.model.cache_dir).expanduser() / "teacher-cache"
            self._teachers[name] = make_teacher(name, args, task=self.task, prompts=self.prompts, cache_dir=str(cache),
                                                style=t.style, ops_per_line=t.ops_per_line)
        return self._teachers[name]

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
                raise ConfigError(f"resume={resume}: no run.dir given and no runs/{cfg.conf_name}-* directory to resume")
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

    def _state(self) -> dict:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"completed": {}}

    def mark_completed(self, name: str, summary: dict) -> None:
        state = self._state()
        state["completed"][name] = summary
        atomic_write(self.dir / "state.json", json.dumps(state, indent=1))

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
        import lightning as L
        import torch

        from stagewise_pl.data.loaders import load_pool
        from stagewise_pl.logging import make_logger
        from stagewise_pl.models.load import load_policy
        from stagewise_pl.tasks.arithmetic import ArithmeticTask
        from stagewise_pl.verify import make_verifier

        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            atomic_write(self.dir / "config.yaml", to_yaml(cfg))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        L.seed_everything(cfg.run.seed, workers=True, verbose=False)
        self.task = ArithmeticTask.from_config(cfg.task)
        self.pool, report = load_pool(cfg.data, self.task)
        self.log(f"training pool: {report.summary()}")
        self.verifier = make_verifier(cfg.verifier)
        self._check_golds(self.pool, "training pool")
        if dist.is_main():
            self._keep_previous_csv()
        self.logger = make_logger(cfg.run.logger, self.dir)
        self.policy, self.tokenizer = load_policy(self.base_model_path(), cfg.model.dtype,
                                                  cfg.model.attn_implementation)
        self._drop_too_long(report)
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora_rank:
            from stagewise_pl.models.lora import apply_lora

            m = cfg.model
            trainable = apply_lora(self.policy, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
            self.log(f"LoRA rank {m.lora_rank} on {', '.join(m.lora_targets)}: {trainable} trainable parameters")
        from stagewise_pl.ledger import DifficultyLedger

        self.ledger = DifficultyLedger(self.dir / "ledger", run_id=self.dir.name, writer=dist.is_main())
        self.data_digest = pool_digest(self.pool)
        if self.prompts:  # bridge_sft or cft phases: a teacher that cannot be built stops the run now, not hours in
            from stagewise_pl.teachers import TeacherError

            try:
                self.teacher(), self.teacher(critic=True)
            except TeacherError as exc:
                raise ConfigError(f"teacher: {exc}") from None

    def _drop_too_long(self, report) -> None:
        """Pool problems whose rendered prompt does not fit the model's context are bad rows (prompt_too_long)."""
        from stagewise_pl.data.loaders import drop_too_long
        from stagewise_pl.models.load import render_prompt

        context = getattr(self.policy.config, "max_position_embeddings", None)
        if not context:
            return
        before = len(self.pool)
        self.pool = drop_too_long(self.pool, report, lambda p: len(self.tokenizer(render_prompt(self.tokenizer, p.prompt),
                                                                                  add_special_tokens=False).input_ids),
                                  context, self.cfg.data.on_bad_row, self.cfg.data.max_bad_fraction)
        if len(self.pool) < before:
            self.log(f"training pool: {report.summary()}")

    def _keep_previous_csv(self) -> None:
        """Lightning's CSV logger deletes an existing metrics.csv: keep an earlier launch's under another name."""
        previous = self.dir / "logs" / "metrics.csv"
        if previous.is_file():
            launch = len(list(previous.parent.glob("metrics.launch-*.csv"))) + 1
            previous.rename(previous.with_name(f"metrics.launch-{launch}.csv"))

    def _check_golds(self, problems, label: str) -> list:
        """Flag golds the verifier cannot grade; return the gradable problems."""
        from stagewise_pl.verify.gold import flag_ungradable_golds, gradable

        flagged = flag_ungradable_golds(problems, self.verifier, progress=self.cfg.run.progress_bar)
        if flagged:
            self.log(f"{label}: {sum(flagged.values())} of {len(problems)} gold answers cannot be graded by "
                     f"verifier {self.cfg.verifier.name!r} ({dict(flagged)}); they are left out of evaluation, "
                     f"profiling and RL")
        return gradable(problems)

    def base_model_path(self) -> str:
        if self.cfg.model.name_or_path == "tiny":
            from stagewise_pl.models.base import tiny_base_model

            return str(tiny_base_model(self.cfg, self.task, log=self.log))
        return self.cfg.model.name_or_path

    # ------------------------------------------------------------------ evaluation
    def _eval_sets(self) -> list:
        """(name, gradable problems, generation budget) per evaluation set; loaded and gold-checked once."""
        if self._eval_cache is None:
            from stagewise_pl.data.loaders import load_benchmark

            ev, sets = self.cfg.eval, []
            if ev.split:
                problems = self.task.split(ev.split)
                if ev.per_level:  # the first per_level problems of each level
                    seen: dict = {}
                    kept = []
                    for p in problems:
                        seen[p.level] = seen.get(p.level, 0) + 1
                        if seen[p.level] <= ev.per_level:
                            kept.append(p)
                    problems = kept
                problems = self._check_golds(problems, f"synthetic-{ev.split}")
                sets.append((f"synthetic-{ev.split}", problems, self.task.max_new_tokens()))
            for bench in ev.benchmarks:
                problems, _ = load_benchmark(bench, limit=ev.limit)
                sets.append((Path(bench).stem, self._check_golds(problems, Path(bench).stem), ev.max_new_tokens or 256))
            self._eval_cache = sets
        return self._eval_cache

    def engine(self):
        """The rollout engine, built once; a vLLM engine gets the current policy's weights pushed and checked."""
        from stagewise_pl.models.load import render_prompts
        from stagewise_pl.rollout import make_engine

        cfg = self.cfg
        if self._engine is None:
            self._engine = make_engine(cfg.rollout, self.policy, self.tokenizer, self.base_model_path(), cfg.model.dtype,
                                       cfg.eval.batch_size, cfg.run.progress_bar)
        if cfg.rollout.engine == "vllm":
            self._engine.sync_weights(self.policy)
            gap = self._engine.canary(self.policy, render_prompts(self.tokenizer, [p.prompt for p in self.pool[:4]]))
            self.log(f"rollout engine: weights pushed (sync {self._engine.syncs}), canary log-prob gap {gap:.2e}")
        return self._engine

    def evaluate(self, label: str):
        from stagewise_pl.eval.evaluate import EvalResult, evaluate_problems

        out_path = self.dir / "eval" / f"{label}.json"
        if out_path.is_file():
            stored = json.loads(out_path.read_text())
            return OrderedDict((name, EvalResult(**r)) for name, r in stored.items())
        ev = self.cfg.eval
        engine = self.engine()
        results = OrderedDict()
        for name, problems, budget in self._eval_sets():
            results[name] = evaluate_problems(engine, self.tokenizer, self.verifier, problems, name, k=ev.k,
                                              temperature=ev.temperature,
                                              max_new_tokens=ev.max_new_tokens or budget, seed=self.cfg.run.seed)
            if self.logger is not None:
                self.logger.log_metrics({f"eval/{label}/{name}/{lvl}/{m}": v
                                         for lvl, row in results[name].by_level.items()
                                         for m, v in row.items() if m != "n"}, step=len(self._state()["completed"]))
        atomic_write(out_path, json.dumps({n: r.to_dict() for n, r in results.items()}, indent=1))
        return results

    # ------------------------------------------------------------------ the plan
    def checkpoint(self) -> Optional[str]:
        """The checkpoint to continue from: resume=PATH, or the last complete one with resume=last (see
        :mod:`stagewise_pl.checkpoints`); None for a fresh run or resume=restart."""
        from stagewise_pl import checkpoints

        resume, directory = self.cfg.run.resume, self.dir / "checkpoints"
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
        """Run (or continue) the plan in one Lightning fit; returns the run directory."""
        if self.cfg.run.resume:
            self._check_resumed_config()
            if self._state().get("finished"):
                self.log(f"resume: {self.dir} has completed every phase; nothing to do")
                return self.dir
        from stagewise_pl.preempt import SignalWatch

        self.resume_from = self.checkpoint()  # checked before the slow set-up: a missing or corrupt one stops now
        # from here a SIGUSR1 / SIGTERM / Ctrl-C is recorded, and acted on at the end of the next step
        with SignalWatch() as self.signals:
            self.setup()
            try:
                return self._execute_plan()
            finally:
                self.verifier.close()

    def _execute_plan(self) -> Path:
        from stagewise_pl.plan import describe, fingerprint
        from stagewise_pl.stages import StagewiseModule, StageManager, PlanTokens
        from stagewise_pl.registry import import_dotted
        from stagewise_pl.train import make_trainer
        from lightning.pytorch.utilities.exceptions import SIGTERMException
        from stagewise_pl.preempt import Preempted, requeue

        cfg = self.cfg
        started = time.time()
        state = self._state()
        if state.get("data") and state["data"] != self.data_digest:
            if not cfg.run.force:
                raise ConfigError(f"resume: the training data differs from the data {self.dir} was started with "
                                  f"(digest {self.data_digest} != {state['data']}); pass run.force=true to resume anyway")
            self.log("resume: run.force=true: continuing although the training data changed")
        if dist.is_main():
            state["data"] = self.data_digest
            atomic_write(self.dir / "state.json", json.dumps(state, indent=1))
        rules_doc = [{"target": r.target, "args": r.args} for r in cfg.stages.rules]
        manager = StageManager(self, self.phases, self.rules, fingerprint(self.phases, rules_doc, self.data_digest))
        self.manager = manager
        extra = []
        for i, path in enumerate(cfg.stages.callbacks):
            try:
                extra.append(import_dotted(path)())
            except (ImportError, TypeError) as exc:
                raise ConfigError(f"stages.callbacks.{i}: {exc}") from None
        ckpt = self.resume_from
        if cfg.run.resume == "restart" and dist.is_main():
            # stopped before its first checkpoint: the run starts over, and so does its record
            self.log(f"resume=restart: starting {self.dir} over (dropping {len(self.ledger.parts())} ledger parts)")
            self.ledger.load_state_dict({"parts": 0})
            state["completed"] = {}
            atomic_write(self.dir / "state.json", json.dumps(state, indent=1))
        self.log("plan:\n  " + "\n  ".join(describe(self.phases)) + (f"\nresuming from {ckpt}" if ckpt else ""))
        trainer = make_trainer(cfg.trainer, cfg.run, -1, 0.0, logger=self.logger,
                               callbacks=[manager, *self.rules, *extra, *self.callbacks], checkpointing=False,
                               max_epochs=1, accumulate=1)
        self.policy.train()  # from_pretrained returns it in eval mode
        module = StagewiseModule(self.policy, manager)
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*(no len|__len__|infinite|inf).*")
            try:
                trainer.fit(module, train_dataloaders=PlanTokens(manager), ckpt_path=ckpt)
            except (Preempted, SIGTERMException) as exc:
                if not isinstance(exc, Preempted):  # Lightning's own SIGTERM stop (the manager checkpointed)
                    exc = Preempted(signal.SIGTERM, "the step in progress", str(self.dir / "checkpoints" / "last.ckpt"))
                self.log(str(exc))
                if cfg.run.requeue and dist.is_main():
                    requeue(self.log)
                raise exc from None
        if dist.is_main():
            self.export(self.dir / "final")
            state = self._state()
            state["finished"] = True
            atomic_write(self.dir / "state.json", json.dumps(state, indent=1))
            columns = OrderedDict((k, v) for k, v in manager.columns.items())
            self.finish(columns, time.time() - started)
        dist.barrier()
        return self.dir

    def accuracy_line(self, label: str, results) -> str:
        parts = []
        for name, res in results.items():
            levels = ", ".join(f"L{lvl} {row['pass@1']:.2f}" for lvl, row in res.by_level.items() if lvl != "all")
            parts.append(f"{name}: pass@1 {res.by_level['all']['pass@1']:.3f} ({levels})")
        return f"  held-out after {label}: " + "; ".join(parts)

    def export(self, directory: Path) -> None:
        """save_pretrained of policy and tokenizer, built aside and renamed into place."""
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        from stagewise_pl.models.lora import merged_state_dict

        self.policy.save_pretrained(tmp, state_dict=merged_state_dict(self.policy))  # LoRA merged, if any
        self.tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    def finish(self, columns: "OrderedDict[str, Any]", seconds: float) -> None:
        from stagewise_pl.eval.evaluate import format_table

        if self.logger is not None:
            self.logger.finalize("success")
        sections = [f"# Run {self.dir.name}\n", f"conf: {self.cfg.conf_name}, seed {self.cfg.run.seed}, "
                    f"{seconds:.0f} s this launch\n"]
        if columns:
            first = next(iter(columns.values()))
            for name in first:
                table = format_table(OrderedDict((label, res[name]) for label, res in columns.items() if name in res))
                sections.append(f"## {name}: greedy pass@1 and mean sampled pass rate by level\n\n{table}\n")
        text = "\n".join(sections)
        atomic_write(self.dir / "summary.md", text)
        self.log("\n" + text)
        self.log(f"run directory: {self.dir}")
