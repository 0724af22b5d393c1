"""distillspec.memory.release_freed: freed tensors' memory goes back to the OS (glibc keeps it otherwise)."""

from __future__ import annotations

import pytest
import torch

from distillspec import memory


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(memory._TRIM is None, reason="needs glibc's malloc_trim (Linux)")
def test_freed_optimizer_sized_blocks_go_back_to_the_os():
    """Blocks of 8 MB (below glibc's mmap threshold once a 20 MB tensor was freed, as training frees many) stay
    resident after they are freed, until release_freed."""
    torch.empty(5 * 2**20)  # made and freed at once: freeing a 20 MB mmapped block raises glibc's threshold above 8 MB
    held = [torch.ones(2**21) for _ in range(48)]  # 48 x 8 MB = 384 MiB, from the heap
    full = _rss_mib()
    del held
    assert memory.release_freed()
    assert _rss_mib() < full - 300  # without the trim, glibc keeps nearly all of it (checked: 0 MiB returned)
