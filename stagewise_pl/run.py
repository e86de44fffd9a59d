"""One run: its directory, its policy, its plan of phases, evaluation and resume.

Layout of a run directory::

    config.yaml            the resolved configuration
    state.json             phases completed (written atomically after each phase)
    checkpoints/<phase>/   Lightning checkpoints (step-N.ckpt, last.ckpt)
    export/<phase>/        the policy after each phase (save_pretrained)
    eval/<label>.json      evaluation results (before, and after each phase)
    logs/                  CSV / TensorBoard / W&B logs
    final/                 the last policy (save_pretrained)
    summary.md             the accuracy table

``resume=last`` continues from the last checkpoint of the first unfinished phase; completed phases
are not rerun (their exported policy is loaded). Resuming a finished run does nothing and says so.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from stagewise_pl.config import Config, ConfigError, resolve_run_dir, to_yaml

# Keys that may differ between the original run and a resumed one.
RESUME_FREE_KEYS = {"run.resume", "run.progress_bar", "run.threads", "run.dir"}


@dataclass
class Phase:
    index: int
    name: str
    kind: str
    steps: int
    lr: Optional[float] = None
    batch_size: Optional[int] = None


def plan_phases(cfg: Config) -> list[Phase]:
    """The plan as data: phases with stable names (``<index>-<kind>`` unless named)."""
    phases = [Phase(i + 1, p.name or f"{i + 1}-{p.kind}", p.kind, p.steps, p.lr, p.batch_size)
              for i, p in enumerate(cfg.phases)]
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phases: names must be unique, got {names}")
    return phases


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
    return {prefix[:-1]: d}


class Run:
    def __init__(self, cfg: Config, log=print):
        self.cfg, self.log = cfg, log
        self.phases = plan_phases(cfg)
        self.dir = self._locate_dir()
        self.callbacks: list = []
        self.ledger = None  # a DifficultyLedger, when the run keeps one (GRPO then records every rollout there)
        self.policy = self.tokenizer = self.logger = self.task = self.verifier = None
        self.pool: list = []
        self._eval_cache: Optional[list] = None
        self._engine = None

    # ------------------------------------------------------------------ layout
    def _locate_dir(self) -> Path:
        cfg = self.cfg
        resume = cfg.run.resume
        if resume and resume != "last":
            ckpt = Path(resume).expanduser()
            if not ckpt.is_file():
                raise ConfigError(f"resume={resume}: no such checkpoint file")
            return ckpt.parent.parent.parent  # <run>/checkpoints/<phase>/<file>.ckpt
        if resume == "last" and not cfg.run.dir:
            candidates = sorted(Path("runs").glob(f"{cfg.conf_name}-*"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise ConfigError(f"resume=last: no run.dir given and no runs/{cfg.conf_name}-* directory to resume")
            self.log(f"resume=last: resuming the newest run, {candidates[-1]}")
            return candidates[-1]
        directory = resolve_run_dir(cfg)
        if resume == "last":
            if not (directory / "config.yaml").is_file():
                raise ConfigError(f"resume=last: {directory} holds no run (no config.yaml); nothing to resume")
        elif (directory / "state.json").exists():
            raise ConfigError(f"run.dir={directory} already holds a run; pass resume=last to continue it "
                              f"or choose another run.dir")
        return directory

    def checkpoint_dir(self, phase: Phase) -> Path:
        return self.dir / "checkpoints" / phase.name

    def _state(self) -> dict:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"completed": {}}

    def _check_resumed_config(self) -> None:
        from omegaconf import OmegaConf

        stored = OmegaConf.to_container(OmegaConf.load(self.dir / "config.yaml"))
        current = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        a, b = flat(stored), flat(current)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_FREE_KEYS)
        if changed:
            raise ConfigError(f"resume: the configuration differs from the one {self.dir} was started with, at "
                              f"{', '.join(changed)}; resume with the same settings, or start a new run.dir")

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
        atomic_write(self.dir / "config.yaml", to_yaml(cfg))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        L.seed_everything(cfg.run.seed, workers=True, verbose=False)
        self.task = ArithmeticTask.from_config(cfg.task)
        self.pool, report = load_pool(cfg.data, self.task)
        self.log(f"training pool: {report.summary()}")
        self.verifier = make_verifier(cfg.verifier)
        self._check_golds(self.pool, "training pool")
        self._keep_previous_csv()
        self.logger = make_logger(cfg.run.logger, self.dir)
        path = self.base_model_path()
        done = [p for p in self.phases if p.name in self._state()["completed"]]
        if done:  # resume after completed phases: their export is the policy to continue from
            path = str(self.dir / "export" / done[-1].name)
            self.log(f"resume: phases {', '.join(p.name for p in done)} are complete; loading {path}")
        self.policy, self.tokenizer = load_policy(path, cfg.model.dtype, cfg.model.attn_implementation)
        if self.ledger is None and (self.dir / "ledger").is_dir():  # resumed: keep recording where it was
            from stagewise_pl.ledger import DifficultyLedger

            self.ledger = DifficultyLedger(self.dir / "ledger", run_id=self.dir.name)

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
                problems = self._check_golds(self.task.split(ev.split), f"synthetic-{ev.split}")
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
    def resume_point(self) -> tuple[Optional[Phase], Optional[str]]:
        """The first unfinished phase and the checkpoint to continue it from (None = from its start)."""
        completed = self._state()["completed"]
        todo = [p for p in self.phases if p.name not in completed]
        if not todo:
            return None, None
        phase = todo[0]
        resume = self.cfg.run.resume
        if resume and resume != "last":
            ckpt = Path(resume).expanduser()
            if ckpt.parent.name != phase.name:
                raise ConfigError(f"resume={resume}: the checkpoint belongs to phase {ckpt.parent.name!r}, but the "
                                  f"first unfinished phase is {phase.name!r}")
            return phase, str(ckpt)
        last = self.checkpoint_dir(phase) / "last.ckpt"
        return phase, str(last) if resume == "last" and last.is_file() else None

    def execute(self) -> Path:
        """Run (or continue) the plan; returns the run directory."""
        from stagewise_pl.phases import PHASES

        for i, phase in enumerate(self.phases):  # unknown kinds fail before any work
            try:
                PHASES.get(phase.kind)
            except (KeyError, ImportError) as exc:
                raise ConfigError(f"phases.{i}.kind: {exc.args[0] if exc.args else exc}") from None
        if self.cfg.run.resume:
            self._check_resumed_config()
        state = self._state()
        if self.cfg.run.resume and self.phases and all(p.name in state["completed"] for p in self.phases):
            self.log(f"resume: {self.dir} has completed every phase; nothing to do")
            return self.dir
        self.setup()
        try:
            return self._execute_plan()
        finally:
            self.verifier.close()

    def _execute_plan(self) -> Path:
        from stagewise_pl.phases import PHASES

        started = time.time()
        columns = OrderedDict()
        if self.cfg.eval.before:
            columns["before"] = self.evaluate("before")
        completed = self._state()["completed"]
        for phase in (p for p in self.phases if p.name in completed):  # evaluated already, or now: the
            columns[phase.name] = self.evaluate(phase.name)           # policy is the last one's export
        while True:
            phase, ckpt = self.resume_point()
            if phase is None:
                break
            self.log(f"phase {phase.name}: {phase.kind}, {phase.steps} steps"
                     + (f" (resuming from {ckpt})" if ckpt else ""))
            summary = PHASES.get(phase.kind)(self, phase, ckpt)
            self.export(self.dir / "export" / phase.name)
            state = self._state()
            state["completed"][phase.name] = summary
            atomic_write(self.dir / "state.json", json.dumps(state, indent=1))
            columns[phase.name] = self.evaluate(phase.name)
            self.log(f"phase {phase.name} done: {json.dumps(summary)}")
        for phase in self.phases:  # a resumed run shows the phases it did not rerun too
            columns.setdefault(phase.name, self.evaluate(phase.name))
        self.export(self.dir / "final")
        self.finish(columns, time.time() - started)
        return self.dir

    def export(self, directory: Path) -> None:
        """save_pretrained of policy and tokenizer, built aside and renamed into place."""
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.save_pretrained(tmp)
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
