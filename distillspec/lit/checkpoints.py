"""Crash-safe training checkpoints: atomic writes in the checkpoint's own directory, one previous good copy,
and a resume that detects, names and skips a damaged file.

Lightning's default writer stages a local checkpoint in $TMPDIR and moves it; across filesystems that move
is a copy, so a kill (or a full disk) mid-save leaves a truncated last.ckpt that blocks every later rerun,
and orphaned /tmp/tmp* files. Here: write `.NAME.tmp-<pid>` beside the target, flush + fsync, keep the
replaced last.ckpt as last.prev.ckpt, then rename (atomic on one filesystem).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

PREVIOUS_SUFFIX = ".prev"   # last.ckpt -> last.prev.ckpt (the previous good checkpoint)
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that failed to load is renamed aside, never deleted
TMP_MARK = ".tmp-"


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + PREVIOUS_SUFFIX + path.suffix)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temp file in the same directory, fsyncs and renames."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.replace(path, previous_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_orphans(ckpt_dir: Path) -> list[Path]:
    """Delete temp files left by a checkpoint write that was killed (`.NAME.tmp-<pid>`); returns them."""
    orphans = sorted(ckpt_dir.glob(f".*{TMP_MARK}*")) if ckpt_dir.is_dir() else []
    for p in orphans:
        p.unlink(missing_ok=True)
    if orphans:
        log.info("removed %d unfinished checkpoint temp file(s) in %s", len(orphans), ckpt_dir)
    return orphans


def checkpoint_step(path: Path) -> int:
    """global_step of a checkpoint; raises if the file is unreadable, truncated or not a training checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(ckpt["global_step"])


def find_resume_checkpoint(last: Path, repair: bool = True) -> tuple[Path, int] | None:
    """(path, global_step) of the newest loadable checkpoint among last.ckpt and last.prev.ckpt, or None.

    A damaged candidate is named in a warning and renamed to *.damaged (kept for inspection) so it never
    blocks a rerun again; with no loadable candidate the run starts over (warning). repair=False (DDP ranks
    other than 0) only reads.
    """
    if repair:
        remove_orphans(last.parent)
    damaged = []
    for cand in (last, previous_path(last)):
        if not cand.exists():
            continue
        try:
            return cand, checkpoint_step(cand)
        except Exception as exc:  # noqa: BLE001 - any failure to read means "not resumable"
            damaged.append(cand)
            if not repair:
                continue
            aside = cand.with_name(cand.name + DAMAGED_SUFFIX)
            os.replace(cand, aside)
            log.warning("checkpoint %s is damaged (%s: %s); moved it to %s", cand, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "", aside)
    if damaged and repair:
        log.warning("no loadable checkpoint in %s; training starts over from step 0", last.parent)
    return None
