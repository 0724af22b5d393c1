"""A competent offline draft: the 4-layer draft distilled once by the project's own recipe, then cached.

    offline:smollm2-135m-L4-warm  ->  <cache_root()>/smollm2-135m-instruct-L4-warm/

The untrained 4-layer draft is accepted ~5 % of the time (alpha_expected ~0.05); the study's drafts start
near 50 %. This one is built by running

    python run.py experiment=offline_warmup pair=offline pair.draft=offline:smollm2-135m-L4 hydra.run.dir=<cache_root()>/.smollm2-135m-instruct-L4-warm.work

(forward KL on cached teacher samples, 120 steps of 8 of 192 prompts, ~8 min on 2 CPU cores; it reaches
alpha_expected ~0.6 on held-out prompts), then copying that run's draft/ into the cache atomically. The
build runs in a subprocess under the cache's file lock; a killed build resumes from its checkpoints
(the work dir is kept until the draft is in place). While it runs, the parent logs the elapsed time and the
build's log path every PROGRESS_S seconds (processes waiting for the lock log likewise, see offline.file_lock).
The build dies with its parent: on Linux the child asks the kernel for SIGKILL when the parent dies
(prctl PR_SET_PDEATHSIG; this covers a parent killed by SIGKILL/SIGTERM), and an interrupted parent (Ctrl-C, an
exception) kills it before returning. The build record (command, steps, the losses' last
values) is saved beside the weights as `warm_build.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from distillspec.errors import ConfigError
from distillspec.models import offline

log = logging.getLogger(__name__)

WARM_DRAFT = "offline:smollm2-135m-L4-warm"
WARM_BASE = "offline:smollm2-135m-L4"           # what the build starts from
WARM_DIRNAME = f"{offline.TARGET_DIRNAME}-L4-warm"
WARM_EXPERIMENT = "offline_warmup"
BUILD_RECORD = "warm_build.json"
REPO_ROOT = Path(__file__).resolve().parents[2]  # run.py and conf/ (the project is installed editable)
PROGRESS_S = 60.0  # the parent logs that the build is still running this often
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def build_command(work_dir: Path) -> list[str]:
    """The run.py command line that trains the warm draft into `work_dir` (a normal run dir)."""
    return [sys.executable, str(REPO_ROOT / "run.py"), f"experiment={WARM_EXPERIMENT}", "pair=offline",
            f"pair.draft={WARM_BASE}", f"hydra.run.dir={work_dir}"]


def die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn that makes the child receive SIGKILL when this process dies (Linux; None elsewhere).

    The kernel sends it when the thread that started the child exits; ensure_warm_draft's thread waits for the
    child, so that is the process's death. A parent that died before the prctl took effect is caught by
    comparing the parent pid."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it after fork
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent already died (the child was reparented)
            os._exit(1)

    return preexec


def run_build(cmd: list[str], env: dict, log_path: Path) -> int:
    """Run the build command; log the elapsed time and `log_path` every PROGRESS_S seconds; the child dies with
    this process. Returns its exit code."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, preexec_fn=die_with_parent())
    try:
        while True:
            try:
                return proc.wait(timeout=PROGRESS_S)
            except subprocess.TimeoutExpired:
                log.info("still building %s: %.0f s so far (~8 min on 2 CPU cores); its log: %s",
                         WARM_DRAFT, time.monotonic() - t0, log_path)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, an exception): leave no build running behind
            proc.kill()
            proc.wait()


def ensure_warm_draft(cache_dir: Path | None = None) -> Path:
    """Path of the warm draft's HF dir; built on first use (a training run, ~8 min on 2 CPU cores)."""
    root = Path(cache_dir) if cache_dir is not None else offline.cache_root()
    work = root / f".{WARM_DIRNAME}.work"

    def build(out_dir: Path) -> None:
        if not (REPO_ROOT / "run.py").is_file() or not (REPO_ROOT / "conf").is_dir():
            raise ConfigError(f"{WARM_DRAFT} is built by the project's run.py and conf/, not found under "
                              f"{REPO_ROOT} (install the project editable: pip install -e .)")
        cmd = build_command(work)
        log.info("building %s (once; ~8 min on 2 CPU cores; a killed build resumes):\n  %s",
                 WARM_DRAFT, " ".join(cmd))
        t0 = time.perf_counter()
        env = {**os.environ, offline.CACHE_ENV: str(root)}
        returncode = run_build(cmd, env, work / "run.log")
        draft = work / "draft"
        if returncode != 0 or not (draft / "config.json").is_file():
            raise RuntimeError(f"building {WARM_DRAFT} failed (exit {returncode}); its log: "
                               f"{work / 'run.log'}; rerun to resume it")
        for f in draft.iterdir():
            shutil.copy2(f, out_dir / f.name)
        metrics = json.loads((work / "metrics.json").read_text()) if (work / "metrics.json").is_file() else {}
        record = {"model": WARM_DRAFT, "built_from": WARM_BASE, "command": " ".join(["python", "run.py", *cmd[2:]]),
                  "seconds": round(time.perf_counter() - t0, 1),
                  "train": {k: v for k, v in (metrics.get("train") or {}).items() if k != "eval_history"}}
        (out_dir / BUILD_RECORD).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")

    final = offline._build_cached(root / WARM_DIRNAME, build, what=WARM_DRAFT)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)  # the draft is in place: checkpoints are no longer needed
    return final
