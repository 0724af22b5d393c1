"""The same command launched twice at once. Without a lock the second launch would cut the first's live CSV,
duplicate steps and leave a stray last-v1.ckpt. A run dir holds run.lock (an OS lock held for the launch's life): a second launch is refused at
once (exit 2) naming the live pid, before Hydra writes into the dir; a killed launch's lock is taken over; a
sweep job held by another launch is recorded as failed (in the sweep's failures.jsonl only) and the sweep goes
on; DDP ranks > 0 take no lock."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.rundir import LOCK_FILE, RunDirInUse, is_rank_zero, lock_run_dir, release_run_dir

ARGS = TINY + ["stage=train", "train.max_steps=60", "train.checkpoint_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launch(run_dir, *extra, **kwargs):
    return subprocess.run([sys.executable, "run.py", *ARGS, *extra, f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, **kwargs)


def _files(run_dir):
    """Every file under run_dir but the lock: path -> (bytes, mtime)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _train_steps(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(C.TRAIN_LOSS)]


def _one_line_refusal(out, pid):
    assert out.returncode == C.EXIT_CONFIG_ERROR, out.stderr[-3000:]
    err = out.stderr.strip()
    assert err.splitlines() == [err] and err.startswith("error: run dir ")  # one line, no traceback
    assert f"in use by pid {pid} on host {socket.gethostname()}" in err and "name=<new name>" in err


def _live_run_dir(run_dir):
    """A run dir as a live launch leaves it mid-training (what the second launch used to cut and overwrite)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("stage: train\n")
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text("step,train/loss\n0,1.0\n1,0.9\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"step 1")
    (run_dir / "run.log").write_text("[..] training step 1\n")
    (run_dir / C.RUN_CONFIG_FILE).write_text("{}")


def test_second_launch_is_refused_at_once_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    _live_run_dir(run_dir)
    before = _files(run_dir)
    lock_run_dir(run_dir)  # the live first launch (simulated by this process)
    try:
        start = time.time()
        _one_line_refusal(_launch(run_dir, timeout=120), os.getpid())
        assert time.time() - start < 30  # refused at start-up, before any model loads
        assert _files(run_dir) == before  # not a byte or mtime changed: Hydra's .hydra/ and run.log included
        assert sorted(p.name for p in run_dir.iterdir()) == sorted([*{k.split("/")[0] for k in before}, LOCK_FILE])
    finally:
        release_run_dir(run_dir)
    assert not (run_dir / LOCK_FILE).exists()

    # A killed launch's lock file (its process is gone, so the OS lock is free) is taken over, with a warning.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": "node7", "since": "yesterday"}))
    again = _launch(run_dir, "stage=plan", timeout=300)  # the memory plan: a real launch that loads nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"from pid {dead_pid} on host node7" in again.stdout + again.stderr
    assert (run_dir / "plan.json").exists() and not (run_dir / LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_two_real_launches_at_once(tmp_path):
    """The issue's case end to end: while a training launch runs, the same command is launched again."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "run.py", *ARGS, f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while str(first.pid) not in ((run_dir / LOCK_FILE).read_text() if (run_dir / LOCK_FILE).exists() else ""):
            assert first.poll() is None and time.time() < deadline, "the first launch ended before taking the lock"
            time.sleep(0.05)
        second = _launch(run_dir, timeout=120)
        assert first.poll() is None, "the first launch finished before the second was refused: proves nothing"
        _one_line_refusal(second, first.pid)
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert _train_steps(run_dir) == list(range(60))  # no step logged twice, none cut
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert "row(s) of" not in (run_dir / "run.log").read_text() and not (run_dir / LOCK_FILE).exists()


def test_sweep_job_held_by_another_launch_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    held, other = sweep / "job0", sweep / "job1"
    _live_run_dir(held)
    before = {k: v for k, v in _files(held).items() if not k.startswith(".hydra")}
    cmd = [sys.executable, "run.py", "-m", *TINY, "stage=eval", "sd.num_eval=2", "sd.measure_speedup=false",
           "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra:job.num}"]
    lock_run_dir(held)  # another launch is running job 0
    try:
        out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        after = {k: v for k, v in _files(held).items() if not k.startswith(".hydra")}
    finally:
        release_run_dir(held)
    assert out.returncode == C.EXIT_CONFIG_ERROR, out.stderr[-3000:]
    assert f"job0: RunDirInUse: run dir {held} is in use by pid {os.getpid()}" in out.stderr
    assert "1 sweep job(s) failed" in out.stderr
    # nothing of the held job's files changed (no error.json written into it, its run.log untouched); Hydra itself
    # rewrites its .hydra/ config (the same command: the same content) before any hook of ours can run
    assert after == before and not (held / C.ERROR_FILE).exists()
    (record,) = [json.loads(line) for line in (sweep / C.FAILURES_FILE).read_text().splitlines()]
    assert record["job"] == held.name and record["exit_code"] == C.EXIT_CONFIG_ERROR
    assert (other / C.METRICS_FILE).exists() and not (other / C.ERROR_FILE).exists()  # the sweep went on


def test_lock_is_released_by_a_killed_process_and_not_taken_by_ddp_ranks(tmp_path, monkeypatch):
    code = ("import sys, time; sys.path.insert(0, {repo!r}); from distillspec.rundir import lock_run_dir; "
            "lock_run_dir({d!r}); print('locked', flush=True); time.sleep(60)").format(repo=str(REPO), d=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=f"in use by pid {holder.pid} ") as exc:
            lock_run_dir(tmp_path)
        assert isinstance(exc.value, ConfigError)  # exit 2, like every refused setting
    finally:
        holder.kill()
        holder.wait()
    try:
        stale = lock_run_dir(tmp_path)  # the killed holder's lock is free: taken over
        assert stale["pid"] == holder.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock_run_dir(tmp_path) is None  # held already by this process: nothing to do
    finally:
        release_run_dir(tmp_path)
    (tmp_path / "odd" / LOCK_FILE).mkdir(parents=True)  # a lock file that cannot be opened: named, not a traceback
    with pytest.raises(ConfigError, match=f"cannot open {tmp_path / 'odd' / LOCK_FILE} .*remove it or fix"):
        lock_run_dir(tmp_path / "odd")
    for key, value, zero in (("LOCAL_RANK", "1", False), ("RANK", "0", True), ("SLURM_PROCID", "3", False)):
        monkeypatch.setenv(key, value)
        assert is_rank_zero() is zero
        if not zero:
            assert lock_run_dir(tmp_path / key) is None and not (tmp_path / key).exists()
        monkeypatch.delenv(key)
