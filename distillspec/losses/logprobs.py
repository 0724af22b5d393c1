"""The log-probability primitives every loss shares (pure torch): compute dtype, clamped log-softmax, LOG_ZERO.

Below divergences, adaptive and sparse, which all import it (and nothing else of each other's internals but
what divergences takes from adaptive). The numerics are described in distillspec.losses.divergences.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_ZERO = -1000.0
"""Finite stand-in for log(0) (see distillspec.losses.divergences' module docstring)."""

__all__ = ["LOG_ZERO", "compute_dtype", "log_probs"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(..., V) -> (..., V) log_softmax(logits / temperature), clamped below at LOG_ZERO (so -inf -> LOG_ZERO)."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).clamp(min=LOG_ZERO)
