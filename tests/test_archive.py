"""distillspec.archive: a sweep's finished jobs copied without their weights, and put back so a rerun reports them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillspec import archive
from distillspec import constants as C
from distillspec.rundir import check_rerun

CONFIG = {"method": "fkl", "train": {"lr": 3e-6}}


def _sweep(root: Path) -> Path:
    """A sweep dir with one finished job (weights, checkpoints, a lock) and one interrupted job."""
    sweep = root / "multirun" / "grid"
    done = sweep / "1_method-fkl"
    for rel, text in {
        C.METRICS_FILE: json.dumps({"stage": "train_eval", "metrics": {"sd/alpha_tok": 0.7}}),
        C.RUN_CONFIG_FILE: json.dumps(CONFIG),
        "per_example.json": "[]", ".hydra/config.yaml": "method: fkl\n", "csv/metrics.csv": "step\n0\n",
        "run.log": "log\n", "run.lock": "{}", "draft/model.safetensors": "weights",
        "checkpoints/last.ckpt": "state", "wandb/run-1/files.txt": "w", ".draft.tmp-12/model.safetensors": "half",
    }.items():
        (done / rel).parent.mkdir(parents=True, exist_ok=True)
        (done / rel).write_text(text)
    half = sweep / "2_method-rkl"
    (half / "checkpoints").mkdir(parents=True)
    (half / "checkpoints" / "last.ckpt").write_text("state")
    (sweep / ".launch.lock").write_text("")
    return sweep


def test_only_finished_jobs_travel_and_without_their_weights(tmp_path):
    sweep = _sweep(tmp_path)
    kept = tmp_path / "experiments" / "grid" / "jobs"
    assert archive.main([str(sweep), str(kept)]) == 0
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert files == ["1_method-fkl/.hydra/config.yaml", "1_method-fkl/csv/metrics.csv", "1_method-fkl/metrics.json",
                     "1_method-fkl/per_example.json", "1_method-fkl/run.log", "1_method-fkl/run_config.json"]
    assert (kept / "1_method-fkl" / C.METRICS_FILE).read_text() == (sweep / "1_method-fkl" / C.METRICS_FILE).read_text()


def test_a_copy_put_back_is_reported_by_a_rerun_not_redone(tmp_path):
    sweep = _sweep(tmp_path)
    kept = tmp_path / "kept"
    archive.copy_results(sweep, kept)
    fresh = tmp_path / "other_machine" / "multirun" / "grid"
    archive.copy_results(kept, fresh)
    saved = check_rerun(fresh / "1_method-fkl", CONFIG, True, has_checkpoint=False)
    assert saved is not None and saved["metrics"]["sd/alpha_tok"] == 0.7
    assert not (fresh / "2_method-rkl").exists()


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "absent", "is not a directory"),
    (lambda root: root, "holds no finished job"),
])
def test_a_source_without_results_is_one_clear_error(tmp_path, capsys, make, message):
    assert archive.main([str(make(tmp_path)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_copying_into_the_sweep_itself_is_refused(tmp_path):
    sweep = _sweep(tmp_path)
    with pytest.raises(ValueError, match="inside it"):
        archive.copy_results(sweep, sweep / "kept")
