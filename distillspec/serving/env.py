"""The serving environment (`.venv-vllm`, built by `make vllm`): checked before any work that needs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from distillspec.errors import ConfigError

VERSION_PROBE = "import vllm; print(vllm.__version__)"
FIX = "run `make vllm` (rm -r .venv-vllm first if it is half-built)"


def check_serving_python(python: Path, timeout: float = 300.0) -> str:
    """vLLM's version in the interpreter `python`; ConfigError in one line when it is missing, not executable,
    or cannot `import vllm` (a half-built env, or the project's own .venv)."""
    python = Path(python)
    if not python.exists():
        raise ConfigError(f"serving env python {python} not found; {FIX}")
    if not os.access(python, os.X_OK) or python.is_dir():
        raise ConfigError(f"serving env python {python} is not an executable; {FIX}")
    try:
        p = subprocess.run([str(python), "-c", VERSION_PROBE], capture_output=True, text=True, timeout=timeout)
    except OSError as exc:  # e.g. Exec format error: not a program at all
        raise ConfigError(f"serving env python {python} cannot run ({exc.strerror or exc}); {FIX}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"serving env python {python}: `import vllm` did not finish in {timeout:g} s; {FIX}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"serving env python {python} cannot import vllm ({last}); {FIX}")
    return p.stdout.strip().splitlines()[-1]


# Thread counts a training shell often sets (OMP_NUM_THREADS=1 beside other jobs, or the cores of a SLURM task).
# vLLM's CPU backend sizes its OpenMP threads itself, keeping a core free for its scheduler process, which spins
# while it waits; an inherited OMP_NUM_THREADS overrides that (and, as we read it, the two then fight for the
# cores). Measured (2026-12-05, 2-core Intel Xeon, vLLM 0.32 CPU build, 24 teacher samples x 32 tokens): 75 s
# with OMP_NUM_THREADS=2 inherited, 14.7 s without. Used for every vLLM process we start (servers, the check's jobs);
# pin their threads with VLLM_CPU_OMP_THREADS_BIND, which vLLM reads.
SERVER_DROPPED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def server_env(base: dict, extra: dict) -> dict:
    """The served engine's environment: `base` without SERVER_DROPPED_ENV, then `extra` (which may set them)."""
    env = {k: v for k, v in base.items() if k not in SERVER_DROPPED_ENV}
    env.update(extra)
    return env
