"""What a run prints. The training bar reads `training step n/max_steps` (not Lightning's
`Epoch 0/-2`), also after a resume; teacher rollouts and periodic SD evaluations show bars; Lightning's tip and
library deprecation noise are gone, and each Lightning message is printed once."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TINY, run_cfg

import distillspec.lit.progress as progress
from distillspec.lit.progress import TRAIN_DESCRIPTION, StepProgressBar


@pytest.fixture
def bars(monkeypatch):
    """Every StepProgressBar the run creates, with (total, initial, n, description) of its training bar at the end."""
    made: list[StepProgressBar] = []
    real = progress.progress_callbacks

    def spy(factory):
        out = real(factory)
        made.extend(out)
        return out

    ends = []
    monkeypatch.setattr(progress, "progress_callbacks", spy)
    monkeypatch.setattr(StepProgressBar, "on_train_end", lambda self, *a: ends.append(
        (self.train_progress_bar.total, self.train_progress_bar.initial, self.train_progress_bar.n,
         self.train_progress_bar.desc)))
    return made, ends


def test_a_run_shows_steps_of_max_steps_and_eval_bars_without_noise(tmp_path, bars, capfd, caplog, recwarn):
    made, ends = bars
    run_cfg(TINY + ["train.max_steps=3", "train.eval_every=2", "train.eval_num=2", "rollout=teacher",
                    "compare_untrained=false", "sd.measure_speedup=false", "sd.draft_quality=false",
                    "rollout.cache_store=false"], tmp_path / "run")  # teacher data computed here, not loaded
    assert len(made) == 1  # the training Trainer's (evaluations run outside Lightning)
    assert [e[:3] for e in ends] == [(3, 0, 3)] and ends[0][3].startswith(TRAIN_DESCRIPTION)
    out, err = capfd.readouterr()
    printed = out + err
    assert "training step" in printed and "3/3" in printed and "Epoch" not in printed
    assert "SD eval @ step 2" in printed  # the periodic evaluation has its own bar
    assert "SD eval: 100%" in printed and "Testing" not in printed  # the final evaluation's bar
    assert "teacher rollouts (once, cached)" in printed
    assert "Tip:" not in printed and not [r for r in caplog.records if "Tip:" in r.getMessage()]
    assert "INFO: GPU available" not in printed  # Lightning's own console handler: it printed everything twice
    noise = [str(w.message) for w in recwarn if any(n in str(w.message) for n in ("LeafSpec", "eval mode"))]
    assert not noise, noise


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_steps: int, ckpt: str | None = None) -> StepProgressBar:
    progress.quiet_lightning()
    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=8), ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    return bar


def test_resumed_bar_starts_at_the_checkpoint_step(tmp_path):
    first = _fit(tmp_path, 2)
    assert (first.train_progress_bar.total, first.train_progress_bar.n) == (2, 2)
    bar = _fit(tmp_path, 5, ckpt=str(tmp_path / "last.ckpt"))
    assert (bar.train_progress_bar.total, bar.train_progress_bar.initial, bar.train_progress_bar.n) == (5, 2, 5)
    assert bar.train_progress_bar.desc.startswith(TRAIN_DESCRIPTION)
