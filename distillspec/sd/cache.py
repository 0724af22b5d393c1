"""A model plus its KV cache for a ragged batch: shared column layout, per-row holes, row removal.

Every row's cache has the same number of columns S. A column is valid for a row when its entry in
`mask` (B, S) is 1. Rows that accepted fewer drafted tokens than others keep the rejected columns as
*holes* (mask 0, never attended to again) instead of being cropped to the slowest row or re-encoded;
tail columns invalid for every row are cropped. Positions are explicit (`position_ids` = number of
valid tokens before the token in its row), so holes do not shift rotary positions. `compact()` moves
holes to the left of every row and drops all-hole columns, bounding the waste; `keep_rows()` drops
finished rows so they stop costing compute. Models with sliding-window layers keep every position in every
layer and get per-row 4-D masks built from the columns' positions (distillspec.sd.masks); full-attention
models get the 2-D column mask.
"""

from __future__ import annotations

import inspect

import torch

from distillspec.errors import ConfigError
from distillspec.sd.clock import ForwardTimer, TimedCalls
from distillspec.sd.masks import LayerMasks, check_decodable


def _cache_kwarg(model) -> str:
    """Name of the cache argument of `model.forward` (`cache` from transformers 5.2x, else `past_key_values`).

    Wrappers whose forward takes `**kwargs` and passes them on (a PEFT/LoRA model) are looked through to the
    wrapped HF model, so a LoRA draft gets `cache` too (no deprecation warning from transformers).
    """
    base = model
    for _ in range(4):  # PeftModel -> LoraModel -> the HF model
        inner = base.get_base_model() if hasattr(base, "get_base_model") else getattr(base, "base_model", None)
        if inner is None or inner is base:
            break
        base = inner
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_dynamic_cache(model, every_position: bool = False):
    """A DynamicCache for `model`; every_position: all layers keep every position (no sliding-window layers
    that drop the positions outside their window)."""
    from transformers import DynamicCache

    if every_position:
        return DynamicCache()  # full layers, created on first use
    try:
        return DynamicCache(config=model.config)
    except (TypeError, AttributeError, ValueError):  # older signature, or a config-less stub model
        return DynamicCache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RaggedKV(TimedCalls):
    """A causal LM with a DynamicCache whose rows may hold holes.

    Args:
        model: HF causal LM with full-attention and/or sliding-window layers (distillspec.sd.support).
        batch_size: rows. device: the model's device.
    Attributes:
        mask: (B, S) long, column validity. pos: (B, S) long, the token position of each column.
        timer: ForwardTimer of the forward calls; forward_time (seconds, reading it waits for the device on
        CUDA) and calls (count) are its totals.
    """

    def __init__(self, model, batch_size: int, device: torch.device) -> None:
        check_decodable(model)
        self.model = model
        self.masks = LayerMasks(model)
        self.cache = new_dynamic_cache(model, every_position=self.masks.windowed)
        self.kwarg = _cache_kwarg(model)
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.device = device
        self.timer = ForwardTimer(device)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def _layers(self):
        layers = getattr(self.cache, "layers", None)
        if layers is None:
            raise ConfigError("ragged SD needs a transformers version whose DynamicCache exposes `.layers` (>= 5.0)")
        for layer in layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise ConfigError(f"ragged SD supports full-attention dynamic caches only, got {type(layer).__name__}")
            if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                yield layer

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Append columns and return logits.

        tokens, valid, positions: (B, w) long; valid marks real tokens (0 = hole/pad column).
        Returns logits (B, k, V) for the last k = logits_to_keep columns (all w when 0), in model dtype.
        """
        self.mask = torch.cat([self.mask, valid.to(self.mask.dtype)], dim=1)
        self.pos = torch.cat([self.pos, positions], dim=1)
        attn = self.mask
        if self.masks.windowed:
            attn = self.masks.build(self.mask, self.pos, torch.arange(self.width - tokens.shape[1], self.width,
                                                                      device=self.device))
        self.timer.start()
        out = self.model(input_ids=tokens, attention_mask=attn, position_ids=positions,
                         use_cache=True, logits_to_keep=logits_to_keep, **{self.kwarg: self.cache})
        self.timer.stop()
        returned = getattr(out, self.kwarg, None)
        if returned is not None:
            self.cache = returned
        return out.logits

    def set_valid(self, start: int, values: torch.Tensor) -> None:
        """Set the mask at columns [start, start + k) to values (B, k)."""
        self.mask[:, start:start + values.shape[1]] = values

    def reserve(self, n: int) -> None:
        """Room for n more columns: always there (the cache grows); StaticKV compacts here."""

    def crop(self, width: int) -> None:
        """Keep the first `width` columns."""
        if width >= self.width:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, :width]
            layer.values = layer.values[:, :, :width]
        self.mask, self.pos = self.mask[:, :width], self.pos[:, :width]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (1-D long index) of the batch."""
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self.mask, self.pos = self.mask.index_select(0, rows), self.pos.index_select(0, rows)

    def hole_fraction(self) -> float:
        return 0.0 if self.mask.numel() == 0 else 1.0 - float(self.mask.float().mean())

    def maybe_compact(self, threshold: float) -> None:
        """Compact when more than `threshold` of the cache's entries are holes (they cost attention work)."""
        if self.hole_fraction() > threshold:
            self.compact()

    def compact(self) -> None:
        """Move every row's holes to its left (order of valid columns kept) and drop all-hole columns."""
        if self.width == 0:
            return
        order = torch.argsort(self.mask, dim=1, stable=True)  # holes (0) first, valid (1) after, in order
        drop = int((self.mask == 0).sum(1).min())
        order = order[:, drop:]
        for layer in self._layers():
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
        self.mask, self.pos = self.mask.gather(1, order), self.pos.gather(1, order)
