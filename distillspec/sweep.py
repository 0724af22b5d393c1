"""Hydra multirun bookkeeping: a failed job is recorded and the sweep goes on; the launch then exits non-zero
naming the failed jobs.

A job's failure is written to its own run dir (error.json: job, error type, message, exit code; error.txt: the
traceback) and appended to the sweep dir's failures.jsonl; `SweepFailures` (a Hydra callback, conf/hydra/
default.yaml) clears failures.jsonl when a sweep starts and reads it when the sweep ends. A rerun of the sweep
runs a failed job again (nothing marks it done; its stale error files are removed when it starts), while
finished jobs report their saved results (distillspec.rundir). Light imports only: Hydra loads this module at
start-up.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from distillspec import constants as C
from distillspec.errors import ConfigError, NonFiniteError

log = logging.getLogger("distillspec")


def exit_code(exc: BaseException) -> int | None:
    """run.py's exit code for an error it reports in one line (None: an unexpected error, shown as a traceback)."""
    if isinstance(exc, ConfigError):
        return C.EXIT_CONFIG_ERROR
    if isinstance(exc, NonFiniteError):
        return C.EXIT_NON_FINITE
    return None


def clear_failure(job_dir: Path) -> None:
    """Remove a previous attempt's error files from `job_dir` (the job is being run again)."""
    for name in (C.ERROR_FILE, C.ERROR_TRACEBACK_FILE):
        (job_dir / name).unlink(missing_ok=True)


def record_failure(job_dir: Path, sweep_dir: Path, exc: BaseException, overrides: list[str]) -> dict[str, Any]:
    """Write job_dir/error.json and error.txt, append the failure to sweep_dir/failures.jsonl; returns the record."""
    code = exit_code(exc)
    record = {"job": job_dir.name, "dir": str(job_dir), "overrides": list(overrides),
              "error_type": type(exc).__name__, "message": str(exc).strip(),
              "exit_code": code if code is not None else C.EXIT_OTHER_ERROR}
    line = json.dumps(record, default=str)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / C.ERROR_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        (job_dir / C.ERROR_TRACEBACK_FILE).write_text("".join(traceback.format_exception(exc)))
    except OSError as err:
        log.error("could not write the error files of %s: %s", job_dir, err)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / C.FAILURES_FILE, "a") as f:  # one short write per job: parallel launchers append safely
        f.write(line + "\n")
    return record


def read_failures(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / C.FAILURES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


class SweepFailures(Callback):
    """Clears the sweep's failures.jsonl at the start of a multirun; at its end, names the failed jobs and exits
    with `summary_exit_code` (0 when none failed)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        (sweep_dir / C.FAILURES_FILE).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failures = read_failures(sweep_dir)
        if failures:
            text = failure_summary(failures, sweep_dir)
            print(f"error: {text}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            sys.exit(summary_exit_code(failures))
