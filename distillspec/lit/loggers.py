"""Run loggers: CSV always; W&B on request (offline unless an API key is set)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from distillspec import constants as C

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one keeps the rows (a resumed
    run appends to them) and starts from the file's header, so new columns rewrite it with every row kept."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that never deletes earlier rows of run_dir/csv/metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_csv_for_resume(path: Path, step: int) -> int:
    """Drop the rows a resume from a checkpoint at global step `step` logs again; returns how many.

    Training rows are logged at the 0-based index of their step (redone from `step` on); periodic-eval
    rows (val/...) at the step count after it (the one at `step` is in the checkpoint, not redone).
    """
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)

    def redone(row: dict) -> bool:
        s = int(float(row.get("step") or -1))
        has = lambda prefix: any(v not in ("", None) for k, v in row.items() if k.startswith(prefix))  # noqa: E731
        return (has("train/") and s >= step) or (has(C.VAL_PREFIX) and s > step)

    keep = [r for r in rows if not redone(r)]
    if len(keep) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(keep)
        tmp.replace(path)
    return len(rows) - len(keep)


def reset_csv_for_start_over(path: Path) -> int:
    """Drop every row of `path` (the header stays, so an open CSV writer keeps its columns); returns how many.

    For training that starts from step 0 in a run dir whose earlier attempt logged rows (killed before its first
    checkpoint, or every checkpoint damaged): its steps are all logged again.
    """
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader, []), sum(1 for _ in reader)
    if rows:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerow(header)
        tmp.replace(path)
    return rows


def build_loggers(run_dir: Path, *, run_name: str, wandb: Mapping[str, Any] | None = None,
                  config: Mapping[str, Any] | None = None) -> list[Logger]:
    """CSV logger under run_dir/csv (appending: earlier rows are kept), plus a W&B logger when `wandb` settings are given.

    W&B runs offline (files under run_dir/wandb) unless WANDB_API_KEY is set or `mode` says otherwise.
    """
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")]
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


def log_report(loggers: list[Logger], report, step: int | None = None) -> None:
    """An EvalReport to every logger: its scalar metrics at `step` (None: 0); with W&B also the example-generations
    table and the acceptance-vs-teacher-entropy chart (at `step`; None: W&B's next step)."""
    scalars = {k: float(v) for k, v in report.metrics.items()}
    for lg in loggers:
        lg.log_metrics(scalars, step=0 if step is None else step)
        lg.save()
    run = next((lg.experiment for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
    if run is None:
        return
    import wandb

    if report.examples:
        cols = list(report.examples[0].keys())
        run.log({"sd/examples": wandb.Table(columns=cols, data=[[e[c] for c in cols] for e in report.examples])},
                step=step)
    if report.entropy_bins:
        cols = list(report.entropy_bins[0].keys())
        table = wandb.Table(columns=cols, data=[[b[c] for c in cols] for b in report.entropy_bins])
        run.log({C.ENTROPY_BINS: table,
                 "sd/acceptance_vs_entropy": wandb.plot.line(table, "bin_hi", "acceptance",
                                                             title="Acceptance vs teacher entropy")}, step=step)
