"""Regression guard for the method itself: a short distillation of the real offline draft raises its
acceptance far beyond run-to-run noise (slow: about two minutes on 2 idle CPU cores).

The run is the default recipe (`python run.py`: teacher samples cached once per prompt, sparse top-64
teacher, forward KL), shrunk: 32 training prompts, 40 steps, 8 evaluation prompts of 48 tokens.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cfg

from distillspec import constants as C

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

SHORT = ["train.max_steps=40", "train.num_train=32", "train.eval_every=0", "train.checkpoint_every=40",
         "sd.num_eval=8", "sd.max_new_tokens=48", "sd.measure_speedup=false", "sd.draft_quality=false",
         "trainer=cpu"]
# Calibration (2026-11-26, this exact run with seed=1 and seed=2, current defaults: lr 1e-3, SD batch 16):
# alpha_expected 0.051 -> 0.501 and 0.054 -> 0.486, gains 0.450 and 0.432; untrained values 0.047-0.054 over
# all runs seen. Seed-to-seed spread of the gain ~0.02, so 0.3 sits far below the gain and far above noise.
MARGIN = 0.3


def test_short_distillation_raises_expected_acceptance(tmp_path):
    out = run_cfg(SHORT, tmp_path)
    saved = json.loads((tmp_path / C.METRICS_FILE).read_text())
    before = saved["before"]["metrics"][C.ALPHA_EXPECTED]
    after = out["metrics"][C.ALPHA_EXPECTED]
    assert after - before > MARGIN, (before, after)
    assert out["metrics"][C.BLOCK_EFFICIENCY] > saved["before"]["metrics"][C.BLOCK_EFFICIENCY]
