"""This process's resident memory. The peak per run: Linux's VmHWM, reset at a run's start so that each job of a
multirun (one process) reports its own peak. Child processes (a target probe, vLLM servers) are not counted.
Where /proc is absent or read-only the peak is None and nothing is reset.

`release_freed` hands memory that Python and torch have freed back to the OS. glibc keeps freed blocks below its
mmap threshold (which rises to 32 MB as large tensors are freed) in its heap, so after training the AdamW state
and gradients (6 GB for a 0.5B draft) stay resident, and a target loaded next adds to them."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

__all__ = ["peak_rss_bytes", "release_freed", "reset_peak", "trim_heap"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Reset the peak to the current RSS (writes 5 to /proc/self/clear_refs); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """The peak RSS since the last reset_peak (or the process start), in bytes; None where unknown."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _libc_trim():
    """glibc's malloc_trim, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_TRIM = _libc_trim()


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc's malloc_trim(0)); False where the C library has none.
    Cheap enough per training step or SD batch: without it, tensors of changing sizes (KV caches of ragged batches)
    leave the heap's freed pages resident and the process's RSS creeps up."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def release_freed() -> bool:
    """Collect garbage, then `trim_heap`; False where the C library has no malloc_trim (the collection still
    runs)."""
    gc.collect()
    return trim_heap()
