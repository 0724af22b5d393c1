"""Lightning test loop around SDEvaluator: progress bar, loggers (CSV / W&B), a final EvalReport."""

from __future__ import annotations

from typing import Any

import lightning as L

from distillspec import constants as C
from distillspec.evaluation import BatchOutcome, EvalReport, SDEvaluator


class SDEvalModule(L.LightningModule):
    """Runs batched SD over the test dataloader; `report` holds the aggregated result after `trainer.test`.

    Scalars go to every logger (at `step` when given); with W&B also a table of example generations and the acceptance-vs-
    teacher-entropy chart.
    """

    def __init__(self, evaluator: SDEvaluator, prefix: str = "", step: int | None = None) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.step = step  # log at this step (the final training step after training) instead of Lightning's 0
        # Registered so Lightning moves them to the device; frozen for evaluation.
        self.draft, self.target = evaluator.draft, evaluator.target
        self.prefix = prefix
        self._outcomes: list[BatchOutcome] = []
        self.report: EvalReport | None = None

    def on_test_epoch_start(self) -> None:
        self.draft.eval()
        self.target.eval()
        self._outcomes = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._outcomes.append(self.evaluator.evaluate_batch(batch, batch_idx))

    def on_test_epoch_end(self) -> None:
        self.report = self.evaluator.finalize(self._outcomes)
        scalars = {self.prefix + k: float(v) for k, v in self.report.metrics.items()}
        if self.step is None:
            self.log_dict(scalars, on_epoch=True, batch_size=1)
        else:  # a fresh test Trainer would log at step 0, before the training rows
            for lg in self.loggers:
                lg.log_metrics(scalars, step=self.step)
        log_report_to_wandb(self.loggers, self.report, prefix=self.prefix, step=self.step)


def log_report_to_wandb(loggers, report: EvalReport, prefix: str = "", step: int | None = None) -> None:
    """Example-generations table and the entropy-bin chart to W&B (no-op without a W&B logger)."""
    run = next((lg.experiment for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
    if run is None:
        return
    import wandb

    if report.examples:
        cols = list(report.examples[0].keys())
        run.log({prefix + "sd/examples": wandb.Table(columns=cols,
                                                     data=[[e[c] for c in cols] for e in report.examples])},
                step=step)
    if report.entropy_bins:
        cols = list(report.entropy_bins[0].keys())
        table = wandb.Table(columns=cols, data=[[b[c] for c in cols] for b in report.entropy_bins])
        run.log({prefix + C.ENTROPY_BINS: table,
                 prefix + "sd/acceptance_vs_entropy": wandb.plot.line(
                     table, "bin_hi", "acceptance", title="Acceptance vs teacher entropy")}, step=step)
