"""What rerunning a command does to its run dir. Finished runs are reported, not
redone, and keep their logs; a resumed run keeps earlier CSV rows; damaged checkpoints are skipped; a changed
config is refused unless resume=force; names cannot leave outputs/."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import TINY, run_cfg

from distillspec import constants as C
from distillspec.errors import ConfigError

ARGS = TINY + ["stage=train_eval", "train.max_steps=2", "train.checkpoint_every=1"]


def _csv_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train_steps(run_dir):
    return [int(r["step"]) for r in _csv_rows(run_dir) if r.get(C.TRAIN_LOSS)]


def test_rerun_of_finished_run_reports_it_and_keeps_logs(tmp_path):
    first = run_cfg(ARGS, tmp_path)
    rows = _csv_rows(tmp_path)
    assert len(rows) >= 3
    stamp = (tmp_path / C.METRICS_FILE).stat().st_mtime_ns
    again = run_cfg(ARGS, tmp_path)
    assert again["metrics"] == json.loads(json.dumps(first["metrics"]))
    assert _csv_rows(tmp_path) == rows
    assert (tmp_path / C.METRICS_FILE).stat().st_mtime_ns == stamp

    # item 7: an edited config (same run dir) is refused with the changed keys ...
    with pytest.raises(ConfigError, match=r"train\.lr: \S+ -> 0\.0123") as exc:  # any default lr -> 0.0123
        run_cfg(ARGS + ["train.lr=0.0123"], tmp_path)
    assert "resume=force" in str(exc.value)
    # ... unless resume=force: the run continues (here to a larger max_steps) and the change is recorded
    out = run_cfg(ARGS + ["train.max_steps=3", "resume=force"], tmp_path)
    assert out["train"]["steps"] == 3 and out["train"]["resumed_from"]
    assert "train.max_steps: 2 -> 3" in (tmp_path / C.CONFIG_CHANGES_FILE).read_text()
    assert _train_steps(tmp_path) == [0, 1, 2]


def test_resume_after_a_crash_keeps_earlier_csv_rows(tmp_path, monkeypatch):
    import distillspec.lit.train_module as tm

    real = tm.check_finite_step

    def crash_at_step_2(loss, params, step, strategy=None):
        if step == 2:
            raise RuntimeError("simulated crash")
        real(loss, params, step, strategy)

    args = ARGS + ["stage=train", "train.max_steps=4"]
    monkeypatch.setattr(tm, "check_finite_step", crash_at_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cfg(args, tmp_path)
    monkeypatch.setattr(tm, "check_finite_step", real)
    out = run_cfg(args, tmp_path)
    assert out["train"]["resumed_from"].endswith("last.ckpt")
    assert _train_steps(tmp_path) == [0, 1, 2, 3]


def test_truncated_checkpoint_falls_back_to_previous_then_starts_over(tmp_path, caplog):
    args = ARGS + ["stage=train"]
    run_cfg(args, tmp_path)
    ckpt = tmp_path / "checkpoints"
    assert torch.load(ckpt / "last.prev.ckpt", weights_only=False)["global_step"] == 1
    data = (ckpt / "last.ckpt").read_bytes()
    (ckpt / "last.ckpt").write_bytes(data[: len(data) // 2])  # killed mid-save / disk full
    (tmp_path / C.METRICS_FILE).unlink()  # as if the run had not finished
    (ckpt / ".last.ckpt.tmp-99999").write_bytes(b"orphan")
    out = run_cfg(args, tmp_path)
    assert out["train"]["resumed_from"].endswith("last.prev.ckpt") and out["train"]["steps"] == 2
    assert "last.ckpt is damaged" in caplog.text
    assert (ckpt / "last.ckpt.damaged").exists() and not (ckpt / ".last.ckpt.tmp-99999").exists()
    for name in ("last.ckpt", "last.prev.ckpt"):  # both damaged: start over, with a warning
        (ckpt / name).write_bytes(b"not a checkpoint")
    (tmp_path / C.METRICS_FILE).unlink()
    out = run_cfg(args, tmp_path)
    assert out["train"]["resumed_from"] is None and out["train"]["steps"] == 2
    assert "starts over" in caplog.text
    # starting over resets the CSV log (keeping the earlier attempt's rows would log steps twice)
    assert _train_steps(tmp_path) == [0, 1]
    assert "dropped 2 row(s) of" in caplog.text


def test_failed_checkpoint_write_leaves_the_old_one(tmp_path, monkeypatch):
    from distillspec.lit import checkpoints

    io = checkpoints.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2}, path)
    assert checkpoints.checkpoint_step(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/../../b", "a//b", "", "a b", "."])
def test_bad_names_are_refused(name):
    from distillspec.rundir import check_name

    with pytest.raises(ConfigError, match="name="):
        check_name(name)


def test_good_names_pass():
    from distillspec.rundir import check_name

    for name in ("arithmetic-tiny", "exp/1", "div-rkl+sd.gamma-3", "a=b,c"):
        assert check_name(name) == name


def test_bad_name_fails_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"name='\.\./\.\./x'"):
        run_cfg(TINY + ["name=../../x"], tmp_path)


def test_bad_resume_value(tmp_path):
    with pytest.raises(ConfigError, match="resume='maybe'"):
        run_cfg(TINY + ["resume=maybe"], tmp_path)


def test_run_py_refuses_bad_name_before_hydra_makes_dirs(capsys):
    from conftest import compose_cfg, load_script
    from omegaconf import OmegaConf

    run_py = load_script("run.py", "run_py")
    with pytest.raises(SystemExit) as exc:
        run_py.check_cli(["pair=tiny", "name=../../x"])
    assert exc.value.code == 2 and "name='../../x'" in capsys.readouterr().err
    run_py.check_cli(["name=ok/run-1", "--cfg", "job"])
    cfg = compose_cfg(["name=../x"])  # a name from a yaml file: the run-dir resolver refuses it too
    with pytest.raises(Exception, match=r"name='\.\./x'"):
        OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)


def test_changed_config_of_an_interrupted_run_reads_well(tmp_path):
    from distillspec.rundir import check_rerun

    check_rerun(tmp_path, {"train": {"lr": 0.1}}, True, has_checkpoint=False)
    with pytest.raises(ConfigError, match=r"holds an interrupted run .*train\.lr: 0\.1 -> 0\.2"):
        check_rerun(tmp_path, {"train": {"lr": 0.2}}, True, has_checkpoint=True)


def test_a_key_added_to_conf_with_its_old_default_is_no_change():
    from distillspec.rundir import config_changes

    old = {"rollout": {"source": "teacher"}}  # a run dir from before rollout.cache_top_k was in conf/rollout/
    assert config_changes(old, {"rollout": {"source": "teacher", "cache_top_k": 64}}) == []
    assert config_changes(old, {"rollout": {"source": "teacher", "cache_top_k": 8}}) == [
        "rollout.cache_top_k: 64 -> 8"]


def test_damaged_run_config_or_metrics_is_named_in_one_line(tmp_path):
    """A damaged run_config.json / metrics.json (outside damage: both are written atomically) stops a rerun in one
    line naming the file, not a bare json.decoder.JSONDecodeError."""
    import subprocess
    import sys

    from conftest import REPO

    def rerun():
        return subprocess.run([sys.executable, "run.py", *TINY, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    (tmp_path / C.METRICS_FILE).write_text('{"stage": "train_eval", "metrics": {}}')
    (tmp_path / C.RUN_CONFIG_FILE).write_text('{"stage": "train_eval", "train": {"lr": 0.0')  # cut mid-write
    for damaged, hint in ((C.RUN_CONFIG_FILE, "delete it to take this launch's config"),
                          (C.METRICS_FILE, "delete it to run the job again")):
        if damaged == C.METRICS_FILE:
            (tmp_path / C.RUN_CONFIG_FILE).unlink()  # (an old run dir without one: its config is not compared)
            (tmp_path / C.METRICS_FILE).write_bytes(b"\x00" * 64)  # zeroed by a crash of the filesystem
        out = rerun()
        err = out.stderr.strip()
        assert out.returncode == C.EXIT_CONFIG_ERROR, err[-3000:]
        assert err.splitlines() == [err] and "JSONDecodeError" not in err  # one line, no traceback
        assert err.startswith(f"error: {tmp_path / damaged} ") and "is damaged: not valid JSON" in err and hint in err
    assert (tmp_path / C.METRICS_FILE).read_bytes() == b"\x00" * 64  # the damaged result is left for the user


def test_read_json_names_the_file_and_the_damage(tmp_path):
    from distillspec.jsonio import DamagedFileError, read_json

    path = tmp_path / "x.json"
    for data, reason in ((b"", "the file is empty"), (b'{"a": ', "Expecting value: line 1 column 7"),
                         (b"\xff\xfe{", "undecodable bytes"), (b'{"a": 1}', None)):
        path.write_bytes(data)
        if reason is None:
            assert read_json(path) == {"a": 1}
            continue
        with pytest.raises(DamagedFileError, match=f"^{path} \\(a result\\) is damaged: not valid JSON \\(.*"
                                                   f"{reason}.*\\); do this$") as exc:
            read_json(path, "a result", fix="do this")
        assert isinstance(exc.value, ConfigError)
