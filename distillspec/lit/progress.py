"""What a run prints while it works: a training bar in optimizer steps, SD-eval bars, and no library noise.

    progress_callbacks(trainer_factory) -> [StepProgressBar()] unless the trainer config turns bars off
    quiet_lightning() -> drop Lightning's duplicate console handler, its litlogger tip, and deprecation warnings
        from code that is not ours (they mean nothing to a user and repeat on every run)
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf

TRAIN_DESCRIPTION = "training step"
TEST_DESCRIPTION = "SD eval"

# (message regex, category): warnings from libraries that a user can do nothing about.
NOISE = (
    # torch deprecates LeafSpec; Lightning's own pytree helper still builds one at every step
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # peft (LoRA) calls transformers' renamed property
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # intended: the frozen teacher stays in eval mode, and checkpoints hold the post-step state
    (r"Found \d+ module\(s\) in eval mode", UserWarning),
    (r"Using ModelCheckpoint with manual optimization", UserWarning),
    # a resumed run's prompts and randomness are functions of the step (DistillModule), not of the loader's state
    (r"You're resuming from a checkpoint that ended before the epoch ended", UserWarning),
)
LIGHTNING_TIPS = ("💡 Tip:",)  # Lightning advertising, printed by every Trainer


class StepProgressBar(TQDMProgressBar):
    """Training bar that counts optimizer steps: `training step: n/max_steps` (resumed runs start at their step),
    the loss and what the step is doing (`phase`: rollouts, loss, SD eval). The test bar reads `SD eval`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: str | None = None

    @property
    def train_description(self) -> str:
        return TRAIN_DESCRIPTION

    @property
    def test_description(self) -> str:
        return TEST_DESCRIPTION

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        """Lightning's bar restarts every epoch at batch 0 of `Epoch k/-2` (max_epochs -1); this one counts steps."""
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                  else convert_inf(self.total_train_batches))
        bar.initial = trainer.global_step  # a resumed run: rate and ETA count only this run's steps
        bar.n = trainer.global_step
        bar.set_description(TRAIN_DESCRIPTION)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(desc=TEST_DESCRIPTION, position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # one loader: no "DataLoader 0" suffix
            self.test_progress_bar.reset(total=convert_inf(self.total_test_batches_current_dataloader))
            self.test_progress_bar.set_description(TEST_DESCRIPTION)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: always "" here
        if self.phase:
            items["phase"] = self.phase
        return items

    def set_phase(self, phase: str | None) -> None:
        """Show what the current step is doing (called by the training module)."""
        self.phase = phase
        bar = self._train_progress_bar
        if self.is_enabled and bar is not None and not bar.disable and self._trainer is not None:
            bar.set_postfix(self.get_metrics(self.trainer, self.trainer.lightning_module))


def progress_callbacks(trainer_factory) -> list:
    """[StepProgressBar()] for a Trainer partial, unless its settings disable the progress bar."""
    keywords = getattr(trainer_factory, "keywords", {}) or {}
    return [] if keywords.get("enable_progress_bar") is False else [StepProgressBar()]


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_TIPS)


def quiet_lightning() -> None:
    """Each Lightning message once, without its tips; library deprecation noise off. Idempotent."""
    root_handled = logging.getLogger().hasHandlers()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if root_handled:  # Hydra's handlers (console + run log) print it already; Lightning adds its own console
            for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
                lg.removeHandler(h)
            lg.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in lg.filters):
            lg.addFilter(_DropTips())
    for message, category in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
