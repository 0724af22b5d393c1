"""Shared pieces of the GPU check: time budget, models from the repo's shape configs, prompts, timing.

Imports only torch and transformers (plus distillspec modules that need nothing else), so the check runs
on a machine with torch, transformers and lightning but no hydra/omegaconf/datasets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# Smoke mode: the same code on CPU with the repo shapes shrunk to these sizes (seconds in the test suite).
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=512, max_position_embeddings=4096)
SMOKE_LAYERS = {"qwen3-0.6b": 2, "qwen3-4b": 4, "smollm-360m": 2, "smollm-1.7b": 4}
PAIRS = {"qwen3": ("qwen3-0.6b", "qwen3-4b"), "smollm": ("smollm-360m", "smollm-1.7b")}


class TimeGuard:
    """A wall-clock budget: `left()` seconds remain; sections and rows check it before starting."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def sub(self, seconds: float) -> "TimeGuard":
        return TimeGuard(min(seconds, max(self.left(), 0.0)))


@dataclass
class Ctx:
    """Run settings every section reads. device/dtype: where and how models are built (smoke: cpu/fp32)."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        """Peak allocated GPU memory since `reset_peak` (GiB); None on CPU (no allocator statistics)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 1024 ** 3

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / 1024 ** 3 if self.device.type == "cuda" else None


def config(ctx: Ctx, shape: str, **overrides):
    """The repo config of `shape` (distillspec/models/configs), shrunk in smoke mode."""
    from distillspec.models.shapes import shape_config

    if ctx.smoke:
        overrides = {**SMOKE_SHAPE, "num_hidden_layers": SMOKE_LAYERS[shape], **overrides}
    return shape_config(shape, **overrides)


def build(ctx: Ctx, shape: str, *, dtype: torch.dtype | None = None, seed: int = 0, **overrides):
    """A random-init model of `shape` built directly on ctx.device in `dtype` (default ctx.dtype)."""
    from distillspec.models.shapes import build_random

    return build_random(config(ctx, shape, **overrides), dtype=dtype or ctx.dtype, device=ctx.device, seed=seed)


@torch.no_grad()
def force_token_map(model) -> None:
    """Zero every layer's output projections (attention o_proj, MLP down_proj).

    Each decoder layer then adds exactly 0 to the residual stream, so the hidden state at every position is
    the input token's embedding and the next token is argmax(lm_head(norm(embed(token)))): a fixed function
    of the current token, whatever the context, batch shape or position. The models are built with untied
    embeddings so that this function is a random map rather than (nearly) the identity. All matmuls still
    run, so the timings are those of the real shape.
    """
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def ragged_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n random prompts of 3/4 * length .. length tokens (ids avoid the first/last 16 of the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    lo = max(1, (3 * length) // 4)
    lens = torch.randint(lo, length + 1, (n,), generator=g).tolist()
    lens[0] = length  # the longest row sets the padded width
    return [torch.randint(16, vocab - 16, (k,), generator=g).tolist() for k in lens]


def batches(ctx: Ctx, prompts: list[list[int]], batch: int, pad: int = 0):
    """Left-padded (input_ids, attention_mask) batches of `batch` prompts on ctx.device."""
    from distillspec.lit.data import left_pad

    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[i:i + batch], pad)
        yield ids.to(ctx.device), mask.to(ctx.device)


def timed(ctx: Ctx, fn, *args, **kwargs):
    """(result, wall seconds) with device synchronisation on both ends."""
    ctx.sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    ctx.sync()
    return out, time.perf_counter() - t0


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table (no tabulate dependency: the GPU machines may not have it)."""
    def cell(x) -> str:
        if x is None:
            return ""
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(out + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])


def release() -> None:
    """Collect garbage and return cached GPU memory (call after dropping a section's models)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
