"""A preallocated (static) KV cache with RaggedKV's ragged semantics, and the optional compiled step.

`StaticKV` keeps RaggedKV's layout (shared columns, per-row validity mask with holes, explicit positions,
`crop`, `compact`, `keep_rows`) in fixed-size buffers, so every decoding call has a fixed shape:
  * keys/values: (B, H_kv, S, D) per layer, S = capacity columns, allocated at the first forward; a call of
    width w writes its columns at [ptr, ptr + w) (`SlotCache.write_idx`, an index tensor) and advances the
    host-side write pointer `ptr`; attention reads all S columns;
  * mask: (B, S) long column validity, positions: (B, S) long token positions; the model gets ready 4-D masks
    (B, 1, w, S) = valid column and column <= ptr + query index, within the window in sliding-window layers
    (distillspec.sd.masks; bool for sdpa, additive float for eager), so transformers builds no mask;
  * crop(width) moves `ptr` back and clears the mask columns after it; the stale keys are overwritten later.
Finished rows: the physical batch stays B (chosen for CUDA graphs: one shape per call width). `keep_rows`
only shrinks the list of active rows; finished rows keep computing on pad inputs (their mask is set to all
valid so attention stays finite) and their logits are dropped. So on this path finished rows still cost
compute, unlike RaggedKV, which removes them. Columns run out only through holes; `reserve(n)` (called
before a block) compacts when fewer than n columns are free.

compile=True (CUDA only) runs the calls after the prefill through `torch.compile(mode="reduce-overhead")`
(CUDA graphs; one graph per call width). The key/value buffers are then kept per (model, role) in a weak
pool and reused by later generations of the same batch size and no larger capacity, so a compiled graph
is not re-recorded for every call of `generate`.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from distillspec import constants as C
from distillspec.errors import ConfigError, check_choice
from distillspec.sd.cache import RaggedKV, _cache_kwarg
from distillspec.sd.clock import ForwardTimer, TimedCalls
from distillspec.sd.masks import MASK_IMPLEMENTATIONS, LayerMasks, check_decodable

KV_MODES = C.KV_MODES  # (named in distillspec.constants: validating sd.kv must not import transformers)
# torch.compile settings of compile=True; tests swap in {"backend": "eager"} to trace on CPU.
COMPILE_OPTIONS = {"mode": "reduce-overhead", "dynamic": False, "fullgraph": False}
_COMPILED: dict = {}
_POOL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {role: SlotCache}


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values (B, H_kv, S, D); `update` writes the new (B, H_kv, w, D) states at the
    columns `cache.write_idx` (w,) and returns the whole buffers."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "SlotCache") -> None:
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        S = self.cache.capacity
        self.device = key_states.device
        self.keys = key_states.new_zeros(B, H, S, D)
        self.values = value_states.new_zeros(B, H, S, value_states.shape[-1])
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.cache.write_idx, key_states)
        self.values.index_copy_(2, self.cache.write_idx, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.capacity, 0

    def get_seq_length(self) -> int:
        return self.cache.ptr

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    """transformers Cache of SlotLayers (created on first use, one per attention layer).

    Attributes: capacity S; batch B; write_idx (w,) long, the columns of the next call; ptr, the columns
    in use (kept in sync by StaticKV).
    """

    def __init__(self, batch_size: int, capacity: int) -> None:
        super().__init__(layer_class_to_replicate=partial(SlotLayer, self))
        self.batch, self.capacity, self.ptr = batch_size, capacity, 0
        self.write_idx: torch.Tensor | None = None

    def full_layers(self):
        for layer in self.layers:
            if not isinstance(layer, SlotLayer):
                raise ConfigError(f"kv='static' supports full-attention layers only, got {type(layer).__name__}")
            if layer.is_initialized:
                yield layer


def _step(model, kwarg: str, cache: SlotCache, tokens, positions, mask4d, keep: int) -> torch.Tensor:
    """One fixed-shape forward: logits (B, keep, V)."""
    out = model(input_ids=tokens, attention_mask=mask4d, position_ids=positions, use_cache=True,
                logits_to_keep=keep, **{kwarg: cache})
    return out.logits


def compiled_step():
    """`_step` under torch.compile(**COMPILE_OPTIONS), built once per option set."""
    key = tuple(sorted(COMPILE_OPTIONS.items()))
    if key not in _COMPILED:
        # draft widths 1 and 2, verify width gamma + 1, decode step 1, per model and batch size
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[key] = torch.compile(_step, **COMPILE_OPTIONS)
    return _COMPILED[key]


def model_device(model) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def check_kv_options(kv: str, compile: bool, models, device: torch.device | None = None) -> None:
    """ConfigError for an unknown kv mode, compile without kv='static', or compile off CUDA."""
    check_choice("kv", kv, KV_MODES)
    if not isinstance(compile, bool):
        raise ConfigError(f"compile={compile!r} is invalid; valid: True or False")
    if compile and kv != "static":
        raise ConfigError(f"compile=True needs kv='static' (fixed shapes); got kv={kv!r}")
    if not compile or COMPILE_OPTIONS.get("backend") == "eager":  # eager backend: the tests' CPU tracing hook
        return
    for m in models:
        dev = device if device is not None else model_device(m)
        if dev is None or dev.type != "cuda":
            raise ConfigError(f"compile=True needs the models on a CUDA device (CUDA graphs through torch.compile"
                              f" mode='reduce-overhead'); {type(m).__name__} is on {dev}; valid on CPU: "
                              f"compile=False")


def release_static_caches() -> None:
    """Drop the pooled static caches and the compiled steps (frees their memory once the models are gone)."""
    _POOL.clear()
    _COMPILED.clear()
    torch._dynamo.reset()


def make_kv(model, batch_size: int, device: torch.device, *, kv: str = "dynamic", compile: bool = False,
            capacity: int = 0, role: str = "") -> "RaggedKV | StaticKV":
    """A RaggedKV (kv='dynamic') or a StaticKV of `capacity` columns (kv='static')."""
    if kv == "dynamic":
        return RaggedKV(model, batch_size, device)
    cache = None
    if compile:
        slots = _POOL.setdefault(model, {})
        cache = slots.get(role)
        if cache is None or cache.batch != batch_size or cache.capacity < capacity:
            cache = slots[role] = SlotCache(batch_size, capacity)
        cache.ptr = 0
    return StaticKV(model, batch_size, device, capacity, cache=cache, compiled=compiled_step() if compile else None)


class StaticKV(TimedCalls):
    """A causal LM with a preallocated cache whose rows may hold holes; RaggedKV's interface.

    Args:
        model: HF causal LM with full-attention and/or sliding-window layers, attn_implementation sdpa or eager.
        batch_size: rows B (fixed). device: the model's device. capacity: columns S.
        cache: a SlotCache to reuse (its capacity may exceed `capacity`). compiled: the compiled `_step` or None.
    Attributes:
        mask: (B, S) long column validity. rows: (b,) active rows. ptr / width: columns in use.
        timer: ForwardTimer of the forward calls (`forward_time`, `calls`).
    """

    def __init__(self, model, batch_size: int, device: torch.device, capacity: int, *,
                 cache: SlotCache | None = None, compiled=None) -> None:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        check_decodable(model)
        if impl not in (None, *MASK_IMPLEMENTATIONS):
            raise ConfigError(f"kv='static' passes a 4-D attention mask; {type(model).__name__} uses "
                              f"attn_implementation={impl!r}; valid: 'sdpa' or 'eager' (or kv='dynamic')")
        self.model, self.kwarg, self.device = model, _cache_kwarg(model), device
        self.cache = cache if cache is not None else SlotCache(batch_size, capacity)
        self.B, self.capacity, self.ptr = batch_size, self.cache.capacity, 0
        self.masks = LayerMasks(model)
        self.mask = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=device)
        self.cols = torch.arange(self.capacity, device=device)
        self.rows = torch.arange(batch_size, device=device)
        self.b = batch_size
        self.compiled, self._warm = compiled, False
        self.timer = ForwardTimer(device)

    @property
    def width(self) -> int:
        return self.ptr

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """(b, w) rows of the active rows -> (B, w), zeros in finished rows."""
        if self.b == self.B:
            return x
        out = x.new_zeros(self.B, x.shape[1])
        out[self.rows] = x
        return out

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                logits_to_keep: int = 0) -> torch.Tensor:
        """tokens, valid, positions: (b, w) long for the active rows. Returns logits (b, k, V)."""
        w, p = tokens.shape[1], self.ptr
        if p + w > self.capacity:
            raise RuntimeError(f"static KV cache full: {p} + {w} columns > capacity {self.capacity} "
                               "(reserve() before the block)")
        tokens, positions = self._full(tokens), self._full(positions)
        self.mask[:, p:p + w] = self._full(valid.to(self.mask.dtype))
        self.positions[:, p:p + w] = positions
        qcol = self.cols[:w] + p
        mask4d = self.masks.build(self.mask, self.positions, qcol, self.cols)  # (B, 1, w, S), or one per type
        self.cache.write_idx, self.cache.ptr = qcol, p
        compiled = self.compiled is not None and self._warm
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        self.timer.start()
        logits = (self.compiled if compiled else _step)(self.model, self.kwarg, self.cache, tokens, positions,
                                                        mask4d, logits_to_keep)
        if compiled:
            logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
        self.timer.stop()
        self._warm = True
        self.ptr = self.cache.ptr = p + w
        return logits if self.b == self.B else logits.index_select(0, self.rows)

    def set_valid(self, start: int, values: torch.Tensor) -> None:
        """Set the mask of the active rows at columns [start, start + k) to values (b, k)."""
        k = values.shape[1]
        if self.b == self.B:
            self.mask[:, start:start + k] = values
        else:
            self.mask[self.rows, start:start + k] = values.to(self.mask.dtype)

    def crop(self, width: int) -> None:
        """Keep the first `width` columns (moves the write pointer back)."""
        if width >= self.ptr:
            return
        self.mask[:, width:self.ptr] = 0
        self.ptr = self.cache.ptr = width

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (1-D long index into the active rows); the others stay in the batch, ignored."""
        gone = torch.ones(self.b, dtype=torch.bool, device=self.device)
        gone[rows] = False
        self.mask[self.rows[gone], : self.ptr] = 1  # finished rows: attention over finite columns only
        self.rows = self.rows[rows]
        self.b = int(self.rows.numel())

    def _active_mask(self) -> torch.Tensor:
        m = self.mask[:, : self.ptr]
        return m if self.b == self.B else m[self.rows]

    def hole_fraction(self) -> float:
        m = self._active_mask()
        return 0.0 if m.numel() == 0 else 1.0 - float(m.float().mean())

    def compact(self) -> None:
        """Move every row's holes to its left and drop columns that are holes in every active row."""
        if self.ptr == 0:
            return
        m = self.mask[:, : self.ptr]
        order = torch.argsort(m, dim=1, stable=True)
        drop = int((self._active_mask() == 0).sum(1).min())
        order = order[:, drop:]
        new = self.ptr - drop
        for layer in self.cache.full_layers():
            for buf in (layer.keys, layer.values):
                idx = order[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
                buf[:, :, :new] = buf[:, :, : self.ptr].gather(2, idx)
        self.positions[:, :new] = self.positions[:, : self.ptr].gather(1, order)
        self.mask[:, :new] = m.gather(1, order)
        self.mask[:, new: self.ptr] = 0
        self.ptr = self.cache.ptr = new

    def maybe_compact(self, threshold: float) -> None:
        """No-op: every call attends over all S columns whatever the holes, so they cost nothing here (and
        checking would be a host sync); the cache compacts only when it runs out of columns (`reserve`)."""

    def reserve(self, n: int) -> None:
        """Make room for n more columns (compacts when needed)."""
        if self.ptr + n > self.capacity:
            self.compact()
        if self.ptr + n > self.capacity:
            raise RuntimeError(f"static KV cache of {self.capacity} columns cannot hold {n} more after compaction "
                               f"({self.ptr} in use)")
