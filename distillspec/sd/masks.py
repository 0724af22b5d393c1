"""Per-row attention masks of the SD caches, one per attention layer type (pure torch).

Sliding-window design: every layer, sliding or full, keeps the keys and values of every position in the
caches' shared column layout (RaggedKV, StaticKV), and a sliding layer gets its window from the mask. Column
c of row b is visible to a query in column j at position t when c is valid (not padding, not a rejected
draft), c <= j, and, in sliding layers, t - pos(b, c) < sliding_window: transformers' sliding_window_overlay
counted in token positions instead of columns, so holes and left padding do not shift the window. Rollback
only rewrites validity (and crops columns invalid in every row), so it never loses a position still inside
a window, and compaction and the static caches work unchanged.

Memory: that of a full-attention model of the same shape, 2 * layers * kv_heads * head_dim * dtype bytes per
position and row (a per-row ring buffer would hold only `sliding_window` positions in sliding layers), plus a
(B, S) long table of positions; the masks, (B, 1, w, S) per layer type and call, are rebuilt every call.
Attention in a sliding layer reads all S columns (masked), not just the window.
"""

from __future__ import annotations

import torch

from distillspec.errors import ConfigError
from distillspec.sd import support

FULL, SLIDING = support.SUPPORTED_LAYER_TYPES
MASK_IMPLEMENTATIONS = ("sdpa", "eager")  # those that take a ready 4-D mask: bool (sdpa) or additive (eager)


def check_decodable(model) -> None:
    """ConfigError unless the SD caches can decode `model` (its layer types; 4-D masks for sliding layers)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    support.check_config(cfg, type(model).__name__)
    types = support.layer_types(support.text_config(cfg))
    impl = getattr(cfg, "_attn_implementation", None)
    if SLIDING in types and impl not in (None, *MASK_IMPLEMENTATIONS):
        raise ConfigError(f"{type(model).__name__} has sliding-window layers, which the SD caches mask per row "
                          f"with a 4-D mask; attn_implementation={impl!r} does not take one; valid: "
                          f"{' or '.join(repr(i) for i in MASK_IMPLEMENTATIONS)}")


class LayerMasks:
    """The 4-D attention masks of one model, from the caches' column validity and token positions.

    Attributes: types (sorted layer types); window (sliding_window, or None without sliding layers);
    windowed (any sliding layer); dtype: additive float masks for attn_implementation "eager", else None
    (bool masks).
    """

    def __init__(self, model) -> None:
        cfg = getattr(model, "config", None)
        text = support.text_config(cfg) if cfg is not None else None
        self.types = sorted(support.layer_types(text)) if text is not None else [FULL]
        self.windowed = SLIDING in self.types
        self.window = getattr(text, "sliding_window", None) if self.windowed else None
        if self.windowed and not (isinstance(self.window, int) and self.window >= 1):
            raise ConfigError(f"{type(model).__name__} has sliding_attention layers but sliding_window="
                              f"{self.window!r}; valid: an integer >= 1")
        impl = getattr(cfg, "_attn_implementation", None)
        self.dtype = getattr(model, "dtype", torch.float32) if impl == "eager" else None

    def build(self, valid: torch.Tensor, positions: torch.Tensor, q_cols: torch.Tensor,
              cols: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Masks (B, 1, w, S) for queries in columns q_cols (w,) long.

        valid, positions: (B, S) long column validity and token position. cols: arange(S) (reused by callers
        that keep one). Returns one mask when the model has one layer type, else {layer type: mask} (the form
        mixed-layer models of transformers take).
        """
        if cols is None:
            cols = torch.arange(valid.shape[1], device=valid.device)
        seen = valid.bool()[:, None, None, :] & (cols[None, :] <= q_cols[:, None])
        masks = {}
        for kind in self.types:
            m = seen
            if kind == SLIDING:
                q_pos = positions[:, q_cols]  # (B, w)
                m = seen & ((q_pos[:, :, None] - positions[:, None, :]) < self.window)[:, None]
            masks[kind] = self._format(m)
        return masks[self.types[0]] if len(masks) == 1 else masks

    def _format(self, mask: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return mask
        zero = torch.zeros((), dtype=self.dtype, device=mask.device)
        return zero.masked_fill(~mask, torch.finfo(self.dtype).min)
