"""Run-directory bookkeeping before any heavy work: safe run names, and what a rerun of a command does.

Rerunning the same command reuses its run dir (the name is a function of the command line):
  * finished (metrics.json written) and unchanged config -> the saved result is reported, nothing is redone
    and no log is touched;
  * interrupted (a checkpoint, no metrics.json) and unchanged config -> training resumes;
  * config changed since the run dir was started (e.g. an edited yaml file) -> ConfigError listing the
    changed keys, unless resume=force (then the run continues and the change is appended to
    config_changes.jsonl).
The config a run dir was started with is kept in run_config.json (Hydra's .hydra/config.yaml is rewritten
on every launch, so it cannot tell). A damaged run_config.json or metrics.json is named in one line.

One launch at a time per run dir: `lock_run_dir` holds run.lock (an OS lock, released when the process dies,
so a killed launch's lock is taken over); a second launch of the same command is refused (RunDirInUse) naming
the live process. Plain Python: callers pass plain dicts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.jsonio import dumps, read_json, to_strict

log = logging.getLogger(__name__)

# Keys that may differ between launches of one run dir (they are also left out of its directory name).
IGNORED_KEYS = ("resume", "name", "logger", "trainer.accelerator")
# Keys added to conf/ after runs existed, with the value those runs used (the spec's default then): a run dir
# whose run_config.json lacks one is not "changed" when the key holds that value.
ADDED_KEYS = {"rollout.cache_top_k": 64, "task.chat_template_kwargs": None, "rollout.engine": "hf",
              "rollout.vllm_url": None, "rollout.vllm_port": None, "rollout.vllm_python": None,
              "rollout.vllm_args": [], "rollout.vllm_sync_every": 1, "rollout.teacher_location": "process"}
_NAME_PART = re.compile(r"[A-Za-z0-9_.+\-=@%,:]+")
RESUME_CHOICES = (True, False, C.RESUME_FORCE)


def check_name(name: object) -> str:
    """ConfigError unless `name` is a relative path of plain parts (no '..', '.', empty or absolute part)."""
    parts = str(name).split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or not _NAME_PART.fullmatch(p) for p in parts):
        raise ConfigError(f"name={name!r} is invalid; valid: a relative name of letters, digits and _ . + - = @ % , : "
                          "(parts separated by '/', no '..' or empty parts), so runs stay under outputs/ and multirun/")
    return name


def check_writable(path: Path, what: str = "output dir") -> None:
    """ConfigError unless a file can be created in `path` (creating it if missing): fail before any work."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not writable ({type(exc).__name__}: {exc.strerror or exc}); fix its "
                          "permissions or free space, or run elsewhere (hydra.run.dir=<dir>)") from None


# What Hydra writes into an existing run dir before the run starts (its log file and saved config).
HYDRA_FILES = ("run.log", ".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


def check_run_dir_writable(path: Path, what: str = "run dir") -> None:
    """ConfigError naming the directory (or file) that stops a run in `path`: the nearest existing directory at or
    above it must be writable, and so must the files Hydra writes into an existing run dir. Creates nothing
    (os.access: for root only a read-only filesystem fails)."""
    path = Path(os.path.abspath(path))
    culprit = None
    if path.is_dir():
        culprit = next((p for p in (path, *(path / f for f in HYDRA_FILES))
                        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0))), None)
    else:
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            culprit = parent
    if culprit is not None:
        raise ConfigError(f"{what} {path} cannot be written: {culprit} is not writable; fix its permissions, or run "
                          "elsewhere (name=<new name>, or hydra.run.dir= / hydra.sweep.dir=<dir>)")


def remove_new_run_dir(new_dirs: list[Path]) -> list[Path]:
    """After a refused launch: remove the directories it created (`new_dirs`, deepest first: the run dir and its
    missing parents, recorded before Hydra made them) when they hold nothing but Hydra's own files, run.log and
    the config snapshot (a refusal after the rerun check, e.g. a model that cannot be loaded). Returns the
    removed ones; anything else in them keeps them."""
    import shutil

    removed = []
    for d in sorted(new_dirs, key=lambda p: len(p.parts), reverse=True):
        if not d.is_dir() or any(p.name not in ("run.log", ".hydra", C.RUN_CONFIG_FILE, LOCK_FILE)
                                 for p in d.iterdir()):
            break  # something else is there: keep it and everything above it
        hydra = d / ".hydra"
        if hydra.is_dir() and any(p.name not in HYDRA_FILES_IN_DOT_HYDRA for p in hydra.iterdir()):
            break
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


HYDRA_FILES_IN_DOT_HYDRA = ("config.yaml", "hydra.yaml", "overrides.yaml")


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for every differing leaf (keys in IGNORED_KEYS or under them are skipped)."""
    a, b = flatten(old), flatten(new)
    ignored = lambda k: any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)  # noqa: E731
    missing = object()
    for k, default in ADDED_KEYS.items():  # a run dir started before the key was in conf/ ran with its default
        if k not in a and k in b:
            a[k] = default
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if not ignored(k) and a.get(k, missing) != b.get(k, missing)]


def check_rerun(run_dir: Path, config: Mapping[str, Any], resume: object, *, has_checkpoint: bool) -> dict | None:
    """Decide what a launch into `run_dir` does (module docstring); returns the saved result of a finished run
    to report, or None to run. Records `config` (JSON-able, resolved) in run_config.json."""
    if resume not in RESUME_CHOICES or isinstance(resume, int) and not isinstance(resume, bool):
        raise ConfigError(f"resume={resume!r} is invalid; valid: true, false, {C.RESUME_FORCE} "
                          "(continue although the config changed)")
    saved_cfg, metrics = run_dir / C.RUN_CONFIG_FILE, run_dir / C.METRICS_FILE
    started = has_checkpoint or metrics.exists()
    config = to_strict(json.loads(json.dumps(config, default=str)))  # NaN -> null: compares equal on reruns
    if started and saved_cfg.exists():
        changes = config_changes(read_json(saved_cfg, "the config this run dir was started with", fix=(
            "delete it to take this launch's config as the run's, or pass name=<new name> for a fresh run")), config)
        if changes and resume != C.RESUME_FORCE:
            what = "a finished" if metrics.exists() else "an interrupted"
            raise ConfigError(f"{run_dir} holds {what} run started with a different config; changed: "
                              f"{'; '.join(changes)}. Pass name=<new name> for a fresh run, or resume="
                              f"{C.RESUME_FORCE} to continue this one with the new config")
        if changes:
            log.warning("resume=%s: continuing %s with a changed config: %s", C.RESUME_FORCE, run_dir, changes)
            with open(run_dir / C.CONFIG_CHANGES_FILE, "a") as f:
                f.write(json.dumps({"changes": changes}) + "\n")
    elif started and not saved_cfg.exists():
        log.warning("%s has no %s (started by an older version); its config cannot be compared",
                    run_dir, C.RUN_CONFIG_FILE)
    tmp = saved_cfg.with_name(f".{saved_cfg.name}.tmp-{os.getpid()}")  # unique: DDP ranks may race
    tmp.write_text(dumps(config, indent=1, sort_keys=True))
    tmp.replace(saved_cfg)
    if metrics.exists() and resume != C.RESUME_FORCE:
        log.info("%s already finished; reporting its saved result (%s). Pass name=<new name> to run again, "
                 "or resume=%s to continue it", run_dir, metrics, C.RESUME_FORCE)
        return read_json(metrics, "this run's final result", fix=(
            "delete it to run the job again (training resumes from its checkpoint), or pass name=<new name>"))
    return None


# --- one launch per run dir ---------------------------------------------------------------------------------

LOCK_FILE = "run.lock"  # in the run dir while a launch runs in it: {"pid", "host", "since", "command"}
# Environment variables that give a DDP process's rank (Lightning's launcher, torchrun, SLURM's srun): only the
# process with rank 0 in all of them takes the lock (the others are the same launch).
RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
_HELD: dict[str, int] = {}  # absolute run dir -> the open, locked lock file


class RunDirInUse(ConfigError):
    """The run dir is held by another live launch (its pid, host and start time in the message)."""


def is_rank_zero() -> bool:
    """False in a DDP process of rank > 0 (Lightning starts those by running the command again)."""
    return all(int(os.environ[k]) == 0 for k in RANK_ENV if os.environ.get(k, "").isdigit())


def _holder(fd: int, tries: int = 20) -> dict:
    """The lock file's record of the process that wrote it ({} when empty or unreadable)."""
    import time

    for _ in range(tries):  # a launch that just took the lock writes its record a moment later
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
        time.sleep(0.05)
    return {}


def lock_run_dir(run_dir: Path) -> dict | None:
    """Hold `run_dir`/run.lock for this process's life (fcntl.flock: the OS releases it when the process ends,
    even killed), creating the run dir if needed. Does nothing in a DDP process of rank > 0, or when this
    process holds it already. Returns the record of an earlier launch that ended without releasing it (killed;
    its lock is taken over), else None. Raises RunDirInUse when a live process holds it."""
    import fcntl
    import socket
    import sys
    import time

    key = os.path.abspath(run_dir)
    if key in _HELD or not is_rank_zero():
        return None
    path = Path(key) / LOCK_FILE
    Path(key).mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open {path} ({exc.strerror or exc}), the lock that keeps two launches out of "
                              "one run dir; remove it or fix its permissions, or pass name=<new name>") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _holder(fd)
            os.close(fd)
            raise RunDirInUse(
                f"run dir {key} is in use by pid {h.get('pid', '?')} on host {h.get('host', '?')} since "
                f"{h.get('since', '?')} (another launch into this run dir); wait for it, or kill it, or pass "
                "name=<new name> for a separate run") from None
        except OSError as exc:  # a filesystem without locks (e.g. Lustre mounted noflock): run unguarded
            os.close(fd)
            log.warning("cannot lock %s (%s): a second launch into this run dir would not be refused", path, exc)
            return None
        try:  # a releasing launch removes the file: the locked one must still be the one at `path`
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = _holder(fd, tries=1) if os.fstat(fd).st_size else None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[key] = fd
    return stale or None


def release_run_dir(run_dir: Path) -> None:
    """Give up the lock taken by `lock_run_dir` (its file is removed); nothing when not held."""
    fd = _HELD.pop(os.path.abspath(run_dir), None)
    if fd is not None:
        (Path(os.path.abspath(run_dir)) / LOCK_FILE).unlink(missing_ok=True)  # still locked: no one can race
        os.close(fd)
