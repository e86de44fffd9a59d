"""What every phase runner and the phase manager work with, built once by the run and handed to them.

A :class:`PhaseContext` holds the configuration, the plan and its kinds' traits, the training pool, the policy
and its tokenizer, the rollout engine (:class:`RolloutEngines`), the verifier, the teachers, the difficulty
ledger, the run directory (where phases write; None for a phase run on its own, like the tiny model's warm-up),
the pass-rate bands of the routing, the held-out evaluation and the signal watch. Runners and the manager
reach nothing else: what earlier phases spent is read from the run directory's ``state.json``
(:meth:`PhaseContext.completed`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from stagewise_pl.buckets import DEFAULT_BANDS, PassRateBands
from stagewise_pl.config import Config
from stagewise_pl.models.load import PromptRenderer
from stagewise_pl.plan import PhaseSpec, PhaseTraits
from stagewise_pl.records import NullSink
from stagewise_pl.rundir import RunDir


class RolloutEngines:
    """The rollout engine, built on first use. :meth:`with_current_weights` hands it out after pushing the
    policy's current weights into it (an engine with its own copy, vLLM) and checking them with a canary."""

    def __init__(self, cfg: Config, policy, tokenizer, model_path: Callable[[], str], canary_prompts: list[str],
                 log: Callable[..., None] = print, engine=None, record_dir=None):
        self.cfg, self.policy, self.tokenizer, self.model_path = cfg, policy, tokenizer, model_path
        self.canary_prompts, self.log, self._engine = canary_prompts, log, engine
        self.record_dir = record_dir  # where rollout.dtype=auto records its decision (the run directory)
        self._eval_engine = None

    def for_evaluation(self):
        """The engine the held-out evaluation samples with: the rollout engine, but in the policy's own precision
        when an hf engine samples rollouts in another (rollout.dtype), so held-out accuracy measures the policy as
        trained and stays comparable across rollout precisions."""
        from stagewise_pl.rollout.hf import HFEngine

        engine = self.with_current_weights()
        if not isinstance(engine, HFEngine) or engine.dtype is None:
            return engine
        if self._eval_engine is None:
            self._eval_engine = HFEngine(self.policy, self.tokenizer, batch_size=engine.batch_size,
                                         progress=engine.progress)
        return self._eval_engine

    def with_current_weights(self):
        from stagewise_pl.rollout import make_engine
        from stagewise_pl.rollout.precision import rollout_dtype

        cfg = self.cfg
        if self._engine is None:
            dtype = rollout_dtype(cfg.rollout.dtype, self.policy, self.record_dir, self.log)
            self._engine = make_engine(cfg.rollout, self.policy, self.tokenizer, self.model_path(), cfg.model.dtype,
                                       cfg.eval.batch_size, cfg.run.progress_bar, rollout_dtype=dtype)
        if hasattr(self._engine, "canary"):  # an engine with its own copy of the weights
            from stagewise_pl.models.load import PromptRenderer

            self._engine.sync_weights(self.policy)
            render = PromptRenderer(self.tokenizer, cfg.model.system_prompt)
            gap = self._engine.canary(self.policy, render.all(self.canary_prompts))
            self.log(f"rollout engine: weights pushed (sync {self._engine.syncs}), canary log-prob gap {gap:.2e}")
        return self._engine


class Teachers:
    """The configured teacher and critic (``teacher.name``, ``teacher.critic``), each built once."""

    def __init__(self, cfg: Config, task=None, prompts: Optional[dict] = None):
        self.cfg, self.task, self.prompts = cfg, task, prompts or {}
        self._built: dict = {}

    def teacher(self):
        t = self.cfg.teacher
        return self._get(t.name, dict(t.args))

    def critic(self):
        t = self.cfg.teacher
        return self._get(t.critic, dict(t.critic_args)) if t.critic else self.teacher()

    def _get(self, name: str, args: dict):
        from pathlib import Path

        from stagewise_pl.teachers.base import make_teacher

        if name not in self._built:
            t = self.cfg.teacher
            cache = Path(self.cfg.model.cache_dir).expanduser() / "teacher-cache"
            self._built[name] = make_teacher(name, args, task=self.task, prompts=self.prompts, cache_dir=str(cache),
                                             style=t.style, ops_per_line=t.ops_per_line)
        return self._built[name]


@dataclass
class PhaseContext:
    cfg: Config
    policy: Any
    tokenizer: Any
    plan: list[PhaseSpec] = field(default_factory=list)
    traits: dict[str, PhaseTraits] = field(default_factory=dict)  # kind -> traits, for every kind of the plan
    pool: list = field(default_factory=list)  # the training pool (every problem loaded)
    verifier: Any = None
    engines: Optional[RolloutEngines] = None
    teachers: Optional[Teachers] = None
    ledger: Any = field(default_factory=NullSink)  # the DifficultyLedger (NullSink: records go nowhere)
    rundir: Optional[RunDir] = None  # None: the phase writes no files (a phase run on its own)
    task: Any = None  # the synthetic task (the default generation length comes from it)
    prompts: dict = field(default_factory=dict)  # prompt templates of the bridge and critique phases
    bands: PassRateBands = DEFAULT_BANDS  # the routing's pass-rate bands: hard / medium / easy
    heldout: Any = None  # HeldOutEvaluation: evaluate(label) -> results by evaluation set
    dev: Any = None  # the development split (phases.dev.DevSplit), graded after training phases; None: no split
    log: Callable[..., None] = print
    signals: Any = None  # the SignalWatch of the launch (stop requests), or None
    # how the routing rules that read profiles classify a pass rate (routing.evidence.rate_key; None = unknown, a
    # profile takes all k samples)
    rate_key: Optional[Callable] = None
    decisions: dict = field(default_factory=dict)  # phase name -> its routing decision so far (the manager's)
    # how every prompt of the run is shown to the model (chat template, model.system_prompt); built from the
    # tokenizer and the configuration when not given
    renderer: Optional[PromptRenderer] = None

    def __post_init__(self):
        if self.renderer is None:
            self.renderer = PromptRenderer(self.tokenizer, self.cfg.model.system_prompt)

    def gradable_pool(self) -> list:
        """The pool problems whose gold answer the verifier can grade."""
        from stagewise_pl.verify.gold import gradable

        return gradable(self.pool)

    def max_new_tokens(self, override: int = 0) -> int:
        """New tokens per completion: ``override``, else the synthetic task's length, else ``eval.max_new_tokens``
        (512 when that is 0)."""
        if override:
            return override
        if self.cfg.data.source == "synthetic" and self.task is not None:
            return self.task.max_new_tokens()
        return self.cfg.eval.max_new_tokens or 512

    def engine_with_current_weights(self):
        """The rollout engine, sampling from the policy as it is now (see :class:`RolloutEngines`)."""
        return self.engines.with_current_weights()

    def completed(self) -> dict[str, dict]:
        """Phase name -> summary of the phases completed so far ({} without a run directory)."""
        return self.rundir.completed() if self.rundir is not None else {}
