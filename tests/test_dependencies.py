"""constraints.txt: the tested versions `make install` uses by default (torch left to TORCH_SPEC), and `make lock`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = ("transformers", "lightning", "hydra-core", "omegaconf", "accelerate", "peft", "pytest")


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
            assert m, f"not a plain name==version pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def test_constraints_pin_the_dependencies_but_not_torch():
    pins = _pins((REPO / "constraints.txt").read_text())
    assert set(CORE) <= set(pins), set(CORE) - set(pins)
    assert "torch" not in pins  # the Makefile installs it first from TORCH_SPEC (CPU wheel here, CUDA elsewhere)
    assert not [p for p in pins if p.startswith(("nvidia-", "triton"))]


def test_lock_script_lists_the_installed_closure():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "lock_constraints.py")], capture_output=True,
                         text=True, check=True).stdout
    pins = _pins(out)
    assert set(CORE) <= set(pins) and "torch" not in pins
    from importlib.metadata import version

    assert pins["transformers"] == version("transformers")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_uses_constraints_unless_cleared(tmp_path):
    def dry(*args: str) -> str:  # -n: print the commands only; -B: as if nothing were installed yet
        return subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path}/venv", *args], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout

    pinned = [ln for ln in dry().splitlines() if "-e " in ln]
    assert pinned and all("-c constraints.txt" in ln for ln in pinned)
    assert "-c " not in dry("CONSTRAINTS=")
    torch_line = [ln for ln in dry().splitlines() if '"torch==' in ln]
    assert torch_line and "-c " not in torch_line[0]  # TORCH_SPEC may name another torch (a GPU build)
    lock = subprocess.run(["make", "-n", "-B", "lock", f"VENV={tmp_path}/venv"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert "tools/lock_constraints.py" in lock and "constraints.txt" in lock
