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


def quiet_third_party() -> None:
    """Keep the console to what the run does: no hardware banners, tips or weight-loading bars."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: lower them after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # on resume
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists")  # kept: see Run.setup
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
