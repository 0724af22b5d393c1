"""Forward-call timing without a device synchronisation per call.

On CUDA each timed call records a pair of `torch.cuda.Event(enable_timing=True)` on the current stream
(no host wait); the pairs are resolved, with one wait on the last event, only when `seconds` is read
(once at the end of a generation). An event pair measures the stream time from the call's first queued
kernel to its last, which on a launch-bound GPU includes the gaps the GPU spends waiting for launches, so
the sum stays the forward's share of the wall time. On CPU (and any other device) `time.perf_counter`
around the call is exact, since the work runs inside the call.
"""

from __future__ import annotations

import time

import torch


class ForwardTimer:
    """Sums the duration of timed calls on `device`; `calls` counts them.

    Usage: `t.start(); out = model(...); t.stop()`, then `t.seconds` (on CUDA: waits for the last recorded
    event and converts all pending pairs; cheap to read again).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.calls = 0
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0: float | torch.cuda.Event | None = None

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._t0 = ev
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("ForwardTimer.stop() without start()")
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self._seconds += time.perf_counter() - self._t0
        self._t0 = None
        self.calls += 1

    @property
    def seconds(self) -> float:
        """Total seconds of the timed calls so far (resolves pending CUDA events: one host wait)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._pending) / 1e3
            self._pending.clear()
        return self._seconds


class TimedCalls:
    """Mixin for a model wrapper holding a `timer` (ForwardTimer): its forward seconds and call count."""

    timer: ForwardTimer

    @property
    def forward_time(self) -> float:
        return self.timer.seconds

    @property
    def calls(self) -> int:
        return self.timer.calls
