"""Hydra multirun bookkeeping: a failed job is recorded and the sweep goes on; the launch then exits non-zero
naming the failed jobs.

A job's failure is written to its own run dir (error.json: job, error type, message, exit code; error.txt: the
traceback) and appended to the sweep dir's failures.jsonl; `SweepFailures` (a Hydra callback, conf/hydra/
default.yaml) clears failures.jsonl when a sweep starts and reads it when the sweep ends. A rerun of the sweep
runs a failed job again (nothing marks it done; its stale error files are removed when it starts), while
finished jobs report their saved results (distillspec.rundir). Light imports only: Hydra loads this module at
start-up.

Two launches may share a sweep dir at once (a grid split over machines, or the same sweep launched twice: a
job dir held by the other launch is refused, distillspec.rundir.lock_run_dir). Each failure line carries its
launch's id, each launch reads back only its own, and failures.jsonl is cleared only by a launch that starts
alone (it holds the sweep dir's .launch.lock shared while it runs).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from distillspec import constants as C
from distillspec.errors import ConfigError, EngineError, NonFiniteError

log = logging.getLogger("distillspec")


def exit_code(exc: BaseException) -> int | None:
    """run.py's exit code for an error it reports in one line (None: an unexpected error, shown as a traceback)."""
    if isinstance(exc, ConfigError):
        return C.EXIT_CONFIG_ERROR
    if isinstance(exc, NonFiniteError):
        return C.EXIT_NON_FINITE
    if isinstance(exc, EngineError):
        return C.EXIT_ENGINE_ERROR
    return None


def clear_failure(job_dir: Path) -> None:
    """Remove a previous attempt's error files from `job_dir` (the job is being run again)."""
    for name in (C.ERROR_FILE, C.ERROR_TRACEBACK_FILE):
        (job_dir / name).unlink(missing_ok=True)


LAUNCH_ENV = "DISTILLSPEC_SWEEP_LAUNCH"  # this sweep launch's id (set at its start; inherited by its job processes)
LAUNCH_LOCK = ".launch.lock"  # in the sweep dir: held shared by each live launch


def record_failure(job_dir: Path, sweep_dir: Path, exc: BaseException, overrides: list[str],
                   job_files: bool = True) -> dict[str, Any]:
    """Write job_dir/error.json and error.txt (unless not `job_files`: the job dir belongs to another live launch),
    append the failure to sweep_dir/failures.jsonl; returns the record."""
    code = exit_code(exc)
    record = {"job": job_dir.name, "dir": str(job_dir), "overrides": list(overrides),
              "error_type": type(exc).__name__, "message": str(exc).strip(),
              "exit_code": code if code is not None else C.EXIT_OTHER_ERROR, "launch": os.environ.get(LAUNCH_ENV)}
    line = json.dumps(record, default=str)
    try:
        if job_files:
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / C.ERROR_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
            (job_dir / C.ERROR_TRACEBACK_FILE).write_text("".join(traceback.format_exception(exc)))
    except OSError as err:
        log.error("could not write the error files of %s: %s", job_dir, err)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / C.FAILURES_FILE, "a") as f:  # one short write per job: parallel launchers append safely
        f.write(line + "\n")
    return record


def read_failures(sweep_dir: Path, launch: str | None = None) -> list[dict[str, Any]]:
    """failures.jsonl's records (when `launch` is given: that launch's, and those of no known launch); a damaged
    line counts as a failure."""
    path = sweep_dir / C.FAILURES_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"job": "?", "error_type": "unreadable", "launch": launch,
                                "message": f"{path}: damaged line {line!r:.80}"})
    return [r for r in records if launch is None or r.get("launch") in (launch, None)]


def summary_exit_code(failures: list[dict[str, Any]]) -> int:
    """The failed jobs' common exit code (2: all refused settings, 3: all non-finite), else 1."""
    codes = {f.get("exit_code", C.EXIT_OTHER_ERROR) for f in failures}
    return codes.pop() if len(codes) == 1 else C.EXIT_OTHER_ERROR


def failure_summary(failures: list[dict[str, Any]], sweep_dir: Path) -> str:
    lines = [f"{len(failures)} sweep job(s) failed (the others ran; details: {sweep_dir / C.FAILURES_FILE} and "
             f"each job's {C.ERROR_FILE}):"]
    for f in failures:
        first = (f.get("message") or "").splitlines()[0][:300] if f.get("message") else ""
        lines.append(f"  {f['job']}: {f['error_type']}: {first}")
    return "\n".join(lines)


_HELD_LAUNCH_LOCKS: list = []  # this process's open .launch.lock files (SweepFailures)


class SweepFailures(Callback):
    """Clears the sweep's failures.jsonl at the start of a multirun; at its end, names the failed jobs and exits
    with `summary_exit_code` (0 when none failed)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import fcntl
        import socket
        import time

        sweep_dir = Path(str(config.hydra.sweep.dir))
        os.environ[LAUNCH_ENV] = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        lock = open(sweep_dir / LAUNCH_LOCK, "a")  # held (shared) until this process ends
        _HELD_LAUNCH_LOCKS.append(lock)  # module-level, not on self: launchers (submitit) pickle the callbacks
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False  # another launch runs in this sweep dir: its failures stay
        except OSError:  # a filesystem without locks
            alone = True
        if alone:
            (sweep_dir / C.FAILURES_FILE).unlink(missing_ok=True)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)
        except OSError:
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failures = read_failures(sweep_dir, os.environ.get(LAUNCH_ENV))
        if failures:
            text = failure_summary(failures, sweep_dir)
            print(f"error: {text}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            sys.exit(summary_exit_code(failures))
