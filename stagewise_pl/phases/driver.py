"""The one LightningModule of a run, the stream of steps Lightning trains on, and a single phase on its own.

:class:`StagewiseModule` holds the policy and hands each training step to a conductor: the phase manager (a whole
plan, :mod:`stagewise_pl.phases.manager`) or :class:`SinglePhase` (one runner outside a plan). Optimisation is
manual throughout, so one Trainer serves phases with different optimisers. :func:`fit_phase` runs one runner in
its own Trainer: the tiny model's warm-up, the benchmarks and tests train through the same runner code as a
plan's phases.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Optional

import lightning as L
import torch


class StagewiseModule(L.LightningModule):
    """The policy, trained by whichever phase runner is current (manual optimisation)."""

    def __init__(self, policy: torch.nn.Module, conductor):
        super().__init__()
        self.policy = policy
        self.automatic_optimization = False
        self.__dict__["_conductor"] = conductor  # not a submodule

    def training_step(self, token, batch_idx: int):
        self._conductor.step(self, token)

    def configure_optimizers(self):
        return self._conductor.configure_optimizers(self)

    def log_row(self, row: dict, every: int = 1) -> None:
        """Metrics straight to the loggers (one call per row)."""
        if self.global_step % max(1, every) == 0:
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)

    def bar(self, name: str, value: float) -> None:
        if self.trainer.progress_bar_callback is not None:
            self.log(name, value, prog_bar=True, logger=False, batch_size=1)


class StepLines(L.Callback):
    """Progress as a line every ``every_s`` seconds (``label: step n[/total], elapsed[, left]``): for output that
    goes to a file (a Slurm log, ``> run.log``), where a live bar writes nothing readable."""

    def __init__(self, every_s: float = 30.0, label: str = "training", total: Optional[int] = None, log=None):
        self.every_s, self.label, self.total = every_s, label, total
        self.write = log or (lambda text: print(text, flush=True))  # (not self.log: Lightning's name)
        self.started = self.last = 0.0
        self.count = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = self.last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last < self.every_s or not trainer.is_global_zero:
            return
        self.last, elapsed = now, now - self.started
        of = f"/{self.total}" if self.total else ""
        left = (f", about {elapsed / self.count * (self.total - self.count):.0f} s left"
                if self.total and self.count < self.total else "")
        self.write(f"{self.label}: step {self.count}{of}, {elapsed:.0f} s{left}")


def step_bar(label: str = "training", total: Optional[int] = None):
    """A live bar for a terminal: ``label`` (the phase) instead of Lightning's "Epoch 0/0", and ``n/total steps`` or
    ``n steps`` (a plan's length is known only phase by phase) instead of "n/--". None without rich."""
    try:
        from lightning.pytorch.callbacks import RichProgressBar
        from rich.progress import ProgressColumn
        from rich.text import Text
    except ImportError:
        return None

    class StepsColumn(ProgressColumn):
        def render(self, task) -> Text:
            total = f"/{int(task.total)}" if task.total not in (None, float("inf")) else ""
            return Text(f"{int(task.completed)}{total} steps")

    class StepBar(RichProgressBar):
        def __init__(self):
            super().__init__(leave=True)
            self.label, self.total = label, total

        @property
        def total_train_batches(self):
            return self.total if self.total else super().total_train_batches

        def _get_train_description(self, current_epoch: int) -> str:
            return self.label

        def configure_columns(self, trainer) -> list:
            columns = super().configure_columns(trainer)
            columns[2] = StepsColumn()
            return columns

        def relabel(self, text: str) -> None:
            self.label = text
            if self.progress is not None and self.train_progress_bar_id is not None:
                self.progress.update(self.train_progress_bar_id, description=text)

    return StepBar()


def progress_callbacks(run_cfg, label: str = "training", total: Optional[int] = None, every_s: float = 30.0,
                       log=None) -> list:
    """``run.progress_bar``: a live bar on a terminal, a line every ``every_s`` seconds otherwise; none when off."""
    if not run_cfg.progress_bar:
        return []
    if sys.stdout.isatty():
        bar = step_bar(label, total)
        if bar is not None:
            return [bar]
    return [StepLines(every_s, label, total, log)]


def relabel_progress(trainer, text: str) -> None:
    """The current phase's name on the bar (and in the lines)."""
    for callback in trainer.callbacks:
        if hasattr(callback, "relabel"):
            callback.relabel(text)
        elif isinstance(callback, StepLines):
            callback.label = text


def make_trainer(trainer_cfg, run_cfg, logger=None, callbacks=(), progress=None) -> L.Trainer:
    """The Trainer a plan (or a single phase) runs in: one pass over a finite stream of steps, manual
    optimisation (no automatic clipping or accumulation: the runners do both), no Lightning checkpointing
    (the phase manager writes its own). ``progress``: the progress callbacks (default
    :func:`progress_callbacks` of ``run_cfg``)."""
    progress = progress_callbacks(run_cfg) if progress is None else progress
    bar = any(not isinstance(cb, StepLines) for cb in progress)
    return L.Trainer(
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy, precision=trainer_cfg.precision, max_steps=-1, max_epochs=1,
        logger=logger if logger is not None else False, callbacks=list(callbacks) + list(progress),
        enable_checkpointing=False, enable_progress_bar=bar, enable_model_summary=False,
        log_every_n_steps=trainer_cfg.log_every_n_steps, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, deterministic=run_cfg.deterministic or None)


def quiet_fit(trainer: L.Trainer, module: L.LightningModule, stream, ckpt_path: Optional[str] = None) -> None:
    """``trainer.fit`` on a stream of step tokens, without the warnings that do not apply to one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*(no len|__len__|infinite|inf).*")
        trainer.fit(module, train_dataloaders=stream, ckpt_path=ckpt_path)


class SinglePhase(L.Callback):
    """Conducts one runner outside a plan: its steps 0, 1, ... until it is done."""

    def __init__(self, runner):
        self.runner = runner

    def __iter__(self):
        step = 0
        while self.runner.has_step(step):  # Lightning fetches one step ahead: see step()
            yield step
            step += 1

    def configure_optimizers(self, module):
        return self.runner.configure_optimizers(module)

    def on_train_start(self, trainer, pl_module) -> None:
        self.runner.start(pl_module, resumed=False)

    def step(self, module, step: int) -> None:
        if step == self.runner.position and not self.runner.done():  # else fetched before the runner knew it
            self.runner.step(module, step)                            # was done: nothing to do


def fit_phase(runner, trainer: Optional[L.Trainer] = None, callbacks=(), label: str = "", every_s: float = 30.0,
              log=None):
    """Run ``runner`` to its end in ``trainer`` (default: one made from its context's configuration, its progress
    labelled ``label`` or the phase's name, a line every ``every_s`` seconds when not on a terminal); returns the
    runner."""
    conductor = SinglePhase(runner)
    ctx = runner.ctx
    progress = progress_callbacks(ctx.cfg.run, label or runner.spec.name, runner.total_steps(), every_s, log)
    trainer = trainer or make_trainer(ctx.cfg.trainer, ctx.cfg.run, callbacks=callbacks, progress=progress)
    trainer.callbacks.append(conductor)
    ctx.policy.train()
    quiet_fit(trainer, StagewiseModule(ctx.policy, conductor), conductor)
    return runner
