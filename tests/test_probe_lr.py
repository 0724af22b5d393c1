"""benchmarks/probe_lr.py on the tiny pair: lr 0 leaves every loss as it was, a small lr lowers the loss of the
batch it stepped on, and each lr starts from the untrained draft."""

from __future__ import annotations

import importlib.util
import math

import pytest
from conftest import REPO

SMALL = ["pair=tiny", "trainer=cpu", "task=arithmetic", "task.num_train=32", "train.num_train=16",
         "train.batch_size=2", "train.max_new_tokens=8", "rollout=teacher"]


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_lr", REPO / "benchmarks" / "probe_lr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_steps_from_the_untrained_draft(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLSPEC_TEACHER_DATA", str(tmp_path / "store"))
    rows = load_probe().main([*SMALL, "--lrs", "0", "1e-3", "--steps", "2", "--val-batches", "2"])
    untrained, zero, small = rows[0], rows[1:3], rows[3:5]
    assert [r[:2] for r in rows] == [("untrained", 0), ("0", 1), ("0", 2), ("0.001", 1), ("0.001", 2)]
    for r in zero:  # lr 0: the weights do not move
        assert r[2] == pytest.approx(r[3], abs=1e-6) and r[4] == pytest.approx(untrained[4], abs=1e-6)
    assert small[0][2] == pytest.approx(zero[0][2], abs=1e-6)  # each lr starts from the untrained draft
    assert all(r[3] < r[2] for r in small)  # the stepped batch's loss falls
    assert all(0.0 <= r[5] <= 1.0 and math.isfinite(r[4]) for r in rows)
    printed = capsys.readouterr().out
    assert "| lr | step |" in printed and "| 0.001 | 2 |" in printed


def test_probe_refuses_on_policy_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLSPEC_TEACHER_DATA", str(tmp_path / "store"))
    with pytest.raises(SystemExit, match="rollout.source must be teacher or fixed, got 'student'"):
        load_probe().main([*SMALL[:-1], "rollout=student"])
