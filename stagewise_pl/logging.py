"""Lightning loggers chosen by name: csv (default), tensorboard, wandb (offline unless WANDB_MODE says otherwise)."""
from __future__ import annotations

import os
from pathlib import Path


def make_logger(kind: str, run_dir: Path):
    from lightning.pytorch import loggers

    if kind == "csv":
        return loggers.CSVLogger(save_dir=str(run_dir), name="logs", version="")
    if kind == "tensorboard":
        try:
            return loggers.TensorBoardLogger(save_dir=str(run_dir), name="logs", version="", default_hp_metric=False)
        except ModuleNotFoundError as exc:
            raise ImportError("run.logger=tensorboard needs tensorboard: pip install tensorboard") from exc
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ImportError("run.logger=wandb needs wandb: pip install wandb") from exc
        offline = os.environ.get("WANDB_MODE", "offline") == "offline"
        return loggers.WandbLogger(save_dir=str(run_dir), project="stagewise_pl", name=run_dir.name, offline=offline)
    raise ValueError(f"unknown logger {kind!r} (csv | tensorboard | wandb)")
