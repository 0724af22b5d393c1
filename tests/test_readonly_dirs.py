"""A read-only outputs/<name>/ or run dir is refused in one line naming the directory, before Hydra creates or
logs into it (not a PermissionError traceback, nor Hydra's "Unable to configure handler 'file'").

As root, chmod does not stop writes, so the read-only directory is simulated: the launched run.py sees
os.access(<that dir>, W_OK) false (the check the start-up uses); everything else is the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from distillspec.errors import ConfigError

SCRIPT = """
import os, runpy, sys
real = os.access
def access(path, mode, *args, **kwargs):
    if os.path.abspath(path) == {ro!r} and mode & os.W_OK:
        return False
    return real(path, mode, *args, **kwargs)
os.access = access
sys.argv = ["run.py", *{args!r}]
runpy.run_path("run.py", run_name="__main__")
"""


def _launch(ro, args):
    code = SCRIPT.format(ro=str(ro), args=list(args))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("which", ["name_dir", "run_dir", "run_log"])
def test_read_only_run_dirs_are_refused_in_one_line(tmp_path, which):
    name_dir = tmp_path / "outputs" / "exp"
    run_dir = name_dir / "job"
    name_dir.mkdir(parents=True)
    if which != "name_dir":  # an existing run dir (a rerun)
        run_dir.mkdir()
        (run_dir / "run.log").write_text("earlier launch\n")
    ro = {"name_dir": name_dir, "run_dir": run_dir, "run_log": run_dir / "run.log"}[which]
    out = _launch(ro, ["pair=tiny", "stage=plan", f"hydra.run.dir={run_dir}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert out.stderr.startswith("error:") and str(ro) in out.stderr and "not writable" in out.stderr
    assert not (run_dir / ".hydra").exists()  # refused before Hydra wrote anything


def test_read_only_sweep_dir_is_refused(tmp_path):
    sweep = tmp_path / "multirun" / "exp"
    (sweep / "0_job").mkdir(parents=True)
    out = _launch(sweep / "0_job", ["-m", "pair=tiny", "stage=plan", "seed=0,1", f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 2 and str(sweep / "0_job") in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]


def test_check_run_dir_writable_names_the_nearest_existing_directory(tmp_path, monkeypatch):
    from distillspec.rundir import check_run_dir_writable

    check_run_dir_writable(tmp_path / "a" / "b")  # missing dirs under a writable one: fine
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p) == str(tmp_path) else real(p, m))
    with pytest.raises(ConfigError, match=f"{tmp_path} is not writable"):
        check_run_dir_writable(tmp_path / "a" / "b")


def test_refused_run_leaves_no_run_dir(tmp_path):
    """A run refused by validation leaves no outputs/<name>/<overrides>/ behind (.hydra, run.log)."""
    run_dir = tmp_path / "outputs" / "exp" / "job"
    (tmp_path / "outputs").mkdir()
    out = subprocess.run([sys.executable, "run.py", "pair=tiny", "sd.gamma=0", f"hydra.run.dir={run_dir}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "sd.gamma=0" in out.stderr
    assert not (tmp_path / "outputs" / "exp").exists()
    assert (tmp_path / "outputs").is_dir()  # it existed before: kept
    # refused after the config snapshot was written (a draft that cannot be loaded): removed too
    out = subprocess.run([sys.executable, "run.py", "pair=tiny", "pair.draft=nope:x", f"hydra.run.dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "nope:x" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "outputs" / "exp").exists()
    # an existing run dir (a real earlier run's files) is never removed by a refused launch
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text("{}")
    out = subprocess.run([sys.executable, "run.py", "pair=tiny", "sd.gamma=0", f"hydra.run.dir={run_dir}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and (run_dir / "run_config.json").exists()
