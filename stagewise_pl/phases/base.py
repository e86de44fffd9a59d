"""The phase-kind registry and the runner interface.

A phase kind is a :class:`PhaseRunner` subclass registered in :data:`PHASES` (or named by dotted path in the
plan). It declares its :class:`~stagewise_pl.plan.PhaseTraits`; the manager builds one runner per phase with
the :class:`~stagewise_pl.phases.context.PhaseContext` and the phase's
:class:`~stagewise_pl.routing.selection.Selection`, and hands it the steps of the phase. Steps are numbered
0, 1, ...; ``position`` is the number done. Optimisation is manual: a runner's ``step`` receives the one
LightningModule of the run (:class:`~stagewise_pl.phases.driver.StagewiseModule`) and uses its optimizer,
scheduler, ``manual_backward`` and loggers (the built-in runners end a step with
:func:`~stagewise_pl.phases.optim.guarded_step`: the non-finite guard, gradient clipping, the optimizer step).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from stagewise_pl.config import ConfigError
from stagewise_pl.plan import PhaseSpec, PhaseTraits
from stagewise_pl.registry import Registry
from stagewise_pl.routing.selection import Selection

if TYPE_CHECKING:
    from stagewise_pl.phases.context import PhaseContext

PHASES: Registry = Registry("phase kind")


def runner_class(kind: str) -> type:
    """The runner class of a registered kind or of a dotted path ``package.module:Class``."""
    cls = PHASES.get(kind)
    if not (isinstance(cls, type) and issubclass(cls, PhaseRunner)):
        raise ConfigError(f"phase kind {kind!r}: {cls!r} is not a PhaseRunner subclass")
    return cls


def kind_traits(kinds: Iterable[str] = ()) -> dict[str, PhaseTraits]:
    """Kind -> traits of every registered kind, and of each of ``kinds`` given by dotted path that imports
    (a kind that does not is left out: the plan check then names it)."""
    out = {name: PHASES.get(name).traits for name in PHASES.names()}
    for kind in kinds:
        if kind not in out and (":" in kind or "." in kind):
            try:
                out[kind] = runner_class(kind).traits
            except (ImportError, KeyError):
                continue
    return out


def number(value) -> str:
    """An integer with thin spaces between thousands (``13 642``), another number to 3 significant digits."""
    return f"{value:,}".replace(",", " ") if isinstance(value, int) else f"{value:.3g}"


class PhaseRunner:
    """One phase's work. Subclasses set ``kind`` and ``traits`` and override what they do differently."""

    kind = ""
    traits = PhaseTraits(step_unit="")
    # the config group whose temperature and generation length the kind samples with ("profile", "grpo"), None
    # when it does not sample the student for its data: a profile counts such rollouts as samples of its own when
    # they match (profile.reuse)
    sampling_group: Optional[str] = None

    def __init__(self, ctx: "PhaseContext", spec: PhaseSpec, selection: Selection):
        self.ctx, self.spec, self.selection = ctx, spec, selection
        self.cfg = ctx.cfg
        self.problems: list = list(selection.selected)
        self.position = 0

    @classmethod
    def selection_limits(cls, cfg) -> tuple[Sequence, int]:
        """(levels, limit) the kind applies to the problems it selects, from its config group; ((), 0) = none."""
        return (), 0

    def has_step(self, step: int) -> bool:
        return step < self.total_steps() and not self.done()

    def total_steps(self) -> int:
        return 1

    def done(self) -> bool:
        return self.position >= self.total_steps()

    def start(self, module, resumed: bool) -> None:
        pass

    def step(self, module, step: int) -> None:
        self.position += 1

    def bridge_context(self, salt: int = 0):
        """The Bridge context of this phase: the student as it is now, the teacher, the verifier, the templates
        (its sampling seeded by the phase and ``salt``)."""
        from stagewise_pl.bridge import BridgeContext

        cfg, ctx = self.cfg, self.ctx
        return BridgeContext(ctx.policy, ctx.tokenizer, ctx.engine_with_current_weights(), ctx.verifier,
                             ctx.teachers.teacher(), ctx.prompts, cfg.bridge,
                             cfg.bridge.max_new_tokens or ctx.max_new_tokens(),
                             seed=cfg.run.seed + 1000 * self.spec.number + 17 + salt, max_length=cfg.trainer.max_length,
                             batch_size=cfg.eval.batch_size, kernel=cfg.trainer.kernel, progress=cfg.run.progress_bar,
                             render=ctx.renderer)

    def configure_optimizers(self, module):
        """An optimiser the trainer can hold; phases that do not train never step it (AdamW allocates no state)."""
        from stagewise_pl.phases.optim import adamw_with_schedule

        return adamw_with_schedule(module.policy, 0.0, (0.9, 0.999), 0.0, 0, 1, 1.0)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def summary(self) -> dict:
        return {"kind": self.kind, "problems": len(self.problems)}

    def brief(self, summary: dict) -> str:
        """The phase's summary (:meth:`summary`, with the manager's ``seconds``, ``select``, ``skipped``) as one short
        console line: the figures every kind has around the kind's own (:meth:`brief_parts`); every figure is in
        ``state.json``."""
        get = summary.get
        parts = []
        if get("optimizer_steps") is not None:
            parts.append(f"{get('optimizer_steps')} optimizer steps")
        if get("problems") is not None:
            select = get("select")
            parts.append(f"{number(get('problems'))} problems"
                         + (f" ({select})" if select not in (None, "all") else ""))
        parts += self.brief_parts(summary)
        if get("teacher_texts"):
            parts.append(f"{number(get('teacher_texts'))} teacher texts")
        if get("generated_tokens"):
            parts.append(f"{number(get('generated_tokens'))} tokens generated")
        if get("seconds") is not None:
            parts.append(f"{get('seconds'):.0f} s")
        if get("skipped"):
            parts.append(f"skipped: {get('skipped')}")
        return ", ".join(parts) if parts else get("kind", self.kind)

    def brief_parts(self, summary: dict) -> list[str]:
        """The kind's own figures in its console line (a profile: its buckets; grpo: its reward)."""
        return []

    def record(self) -> dict:
        """What the phase adds to its routing decision when it ends (kept in checkpoints, written to
        ``routing/NN-<phase>.json``; a profile: the evidence of each problem); {} = nothing."""
        return {}

    def curves(self) -> dict[str, list]:
        """Per-step series of the phase (written to ``<run>/curves/`` when it ends); {} = none."""
        return {}
