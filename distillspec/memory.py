"""This process's peak resident memory, per run: Linux's VmHWM, reset at a run's start so that each job of a
multirun (one process) reports its own peak. Child processes (a target probe, vLLM servers) are not counted.
Where /proc is absent or read-only the peak is None and nothing is reset."""

from __future__ import annotations

from pathlib import Path

__all__ = ["peak_rss_bytes", "reset_peak"]

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
