"""File modes of a shared cache (models, teacher data): what the umask gives, applied to what builders wrote.

Plain Python, imported by the model builders (offline, tiny, warm) and the teacher-data store alike.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """This process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode a new file (or directory) gets under the umask: 0o644 (0o755) under umask 022."""
    return (0o777 if directory else 0o666) & ~umask()


def share_tree(path: Path) -> None:
    """chmod `path` and everything under it to the umask's modes. Builders write some files 0600 (mkstemp,
    mkdtemp, transformers' model.safetensors); in a shared cache other users must be able to read them."""
    fmode, dmode = file_mode(), file_mode(directory=True)
    os.chmod(path, dmode if path.is_dir() else fmode)
    for p in path.rglob("*") if path.is_dir() else ():
        if not p.is_symlink():
            os.chmod(p, dmode if p.is_dir() else fmode)
