"""Hydra callbacks (conf/hydra/default.yaml) that run before Hydra creates or logs into the run directory.

`RunDirCheck` refuses an unwritable run dir (or sweep dir, or an existing job dir in it) in one line, exit 2:
Hydra's own failure there is a traceback (a PermissionError, or "Unable to configure handler 'file'"). It also
takes a single run's lock (distillspec.rundir.lock_run_dir) before Hydra writes its log and config there, so a
second launch of a running command is refused with nothing of the first touched. (A sweep job's lock is taken
in run.py's main: Hydra has no hook before it writes a job's files.)
Light imports only: Hydra loads this module at start-up.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.rundir import check_run_dir_writable, lock_run_dir


def _resolve_dir(config: DictConfig, key: str) -> Path | None:
    """config's `key` (hydra.run.dir / hydra.sweep.dir) resolved as Hydra will, or None if it cannot be yet."""
    HydraConfig.instance().set_config(config)  # ${hydra:...} in the dir pattern reads it; run_job sets it again
    try:
        value = OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - Hydra reports a bad pattern itself
        return None
    return Path(str(value)) if value is not None else None


def _refuse(exc: ConfigError) -> None:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(C.EXIT_CONFIG_ERROR)


# The directories a single run's launch is about to create (its run dir and missing parents): a refused run
# removes them again (run.py, distillspec.rundir.remove_new_run_dir).
NEW_RUN_DIRS: list[Path] = []
# The lock record of an earlier launch that was killed holding the run dir (its lock taken over; run.py logs it).
TAKEN_OVER: list[dict] = []


class RunDirCheck(Callback):
    """Before a run: its run dir must be writable (and the directories about to be created are noted in
    NEW_RUN_DIRS), and no other live launch may hold it. Before a sweep: the sweep dir and its existing job
    dirs must be writable."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _resolve_dir(config, "hydra.run.dir")
        try:
            if run_dir is not None:
                check_run_dir_writable(run_dir)
                run_dir = run_dir.absolute()
                NEW_RUN_DIRS[:] = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
                if stale := lock_run_dir(run_dir):
                    TAKEN_OVER[:] = [stale]
        except ConfigError as exc:
            _refuse(exc)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _resolve_dir(config, "hydra.sweep.dir")
        try:
            if sweep_dir is not None:
                check_run_dir_writable(sweep_dir, "sweep dir")
                for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []:
                    check_run_dir_writable(job_dir, "sweep job dir")
        except ConfigError as exc:
            _refuse(exc)
