"""The one LightningModule of a run, the stream of steps Lightning trains on, and a single phase on its own.

:class:`StagewiseModule` holds the policy and hands each training step to a conductor: the phase manager (a whole
plan, :mod:`stagewise_pl.phases.manager`) or :class:`SinglePhase` (one runner outside a plan). Optimisation is
manual throughout, so one Trainer serves phases with different optimisers. :func:`fit_phase` runs one runner in
its own Trainer: the tiny model's warm-up, the benchmarks and tests train through the same runner code as a
plan's phases.
"""
from __future__ import annotations

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


def make_trainer(trainer_cfg, run_cfg, logger=None, callbacks=()) -> L.Trainer:
    """The Trainer a plan (or a single phase) runs in: one pass over a finite stream of steps, manual
    optimisation (no automatic clipping or accumulation: the runners do both), no Lightning checkpointing
    (the phase manager writes its own)."""
    return L.Trainer(
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy, precision=trainer_cfg.precision, max_steps=-1, max_epochs=1,
        logger=logger if logger is not None else False, callbacks=list(callbacks), enable_checkpointing=False,
        enable_progress_bar=run_cfg.progress_bar, enable_model_summary=False,
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


def fit_phase(runner, trainer: Optional[L.Trainer] = None, callbacks=()):
    """Run ``runner`` to its end in ``trainer`` (default: one made from its context's configuration); returns
    the runner."""
    conductor = SinglePhase(runner)
    ctx = runner.ctx
    trainer = trainer or make_trainer(ctx.cfg.trainer, ctx.cfg.run, callbacks=callbacks)
    trainer.callbacks.append(conductor)
    ctx.policy.train()
    quiet_fit(trainer, StagewiseModule(ctx.policy, conductor), conductor)
    return runner
