"""Run loggers: CSV always; W&B on request (offline unless an API key is set)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import CSVLogger, Logger

log = logging.getLogger(__name__)


def build_loggers(run_dir: Path, *, run_name: str, wandb: Mapping[str, Any] | None = None,
                  config: Mapping[str, Any] | None = None) -> list[Logger]:
    """CSV logger under run_dir/csv, plus a W&B logger when `wandb` settings are given.

    W&B runs offline (files under run_dir/wandb) unless WANDB_API_KEY is set or `mode` says otherwise.
    """
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if wandb is not None:
        from lightning.pytorch.loggers import WandbLogger

        settings = dict(wandb)
        mode = settings.pop("mode", None) or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "offline":
            log.info("W&B: offline mode (no WANDB_API_KEY); sync later with `wandb sync %s/wandb`", run_dir)
        loggers.append(WandbLogger(name=run_name, save_dir=str(run_dir), mode=mode,
                                   project=settings.pop("project", "distillspec"),
                                   entity=settings.pop("entity", None), group=settings.pop("group", None),
                                   tags=list(settings.pop("tags", []) or []), config=dict(config or {}),
                                   **settings))
    return loggers


def wandb_run(loggers: list[Logger]):
    """The underlying wandb run if a W&B logger is present, else None."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            return lg.experiment
    return None
