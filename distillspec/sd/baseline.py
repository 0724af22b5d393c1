"""Target-only (or any single model) autoregressive decoding of a left-padded batch with a KV cache.

The reference point for SD speedups and the sampler of student/teacher rollouts. Finished rows are
removed from the batch as in the SD engine, so both sides get the same batching advantages (kv="dynamic";
with kv="static" they stay in the fixed-shape batch, as in the engine's static path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from distillspec.sd.cache import _sync
from distillspec.sd.clock import ForwardTimer
from distillspec.sd.engine import check_prompts
from distillspec.sd.sampling import process_logits, sample
from distillspec.sd.static_cache import check_kv_options, make_kv


@dataclass
class GenResult:
    """tokens: (B, T) long right-padded with pad; lengths: (B,) (EOS included); time_total: seconds;
    time_forward: seconds inside model forwards (prefill included); num_calls: forward calls (prefill
    included); time_prefill: seconds of the prefill forward (the prompt), part of time_forward."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    time_total: float
    time_forward: float = 0.0
    num_calls: int = 0
    time_prefill: float = 0.0


@torch.no_grad()
def autoregressive_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                            temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                            eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                            logits_hook: Callable[[torch.Tensor, int, torch.Tensor], None] | None = None,
                            kv: str = "dynamic", compile: bool = False) -> GenResult:
    """Sample (temperature > 0, nucleus top_p) or greedily decode (temperature 0) up to max_new_tokens.

    input_ids, attention_mask: (B, L) left-padded. Returns tokens (B, T) with T <= max_new_tokens.
    logits_hook(rows (A,), t, logits (A, V)): called at every step t with the raw (unprocessed) logits
    that predict token t of the still-active rows `rows` (indices into the batch), before sampling.
    kv, compile: the cache ("dynamic" or "static") and, with "static" on CUDA, CUDA graphs through torch.compile
    (see `SpeculativeDecoder`).
    """
    check_prompts(input_ids, attention_mask, max_new_tokens, (model,))
    check_kv_options(kv, compile, (model,), input_ids.device)
    t0 = time.perf_counter()
    dev, B = input_ids.device, input_ids.shape[0]
    eos_list = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos = torch.tensor(eos_list, dtype=torch.long, device=dev)
    mask = attention_mask.long()
    cache = make_kv(model, B, dev, kv=kv, compile=compile, capacity=input_ids.shape[1] + max_new_tokens + 8, role="ar")
    logits = cache.forward(input_ids, mask, (mask.cumsum(1) - 1).clamp(min=0), logits_to_keep=1)[:, -1]
    prefill = cache.timer  # read at the end: no device wait here
    cache.timer = ForwardTimer(dev)
    pos = mask.sum(1)
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.arange(B, device=dev)
    for t in range(max_new_tokens):
        if logits_hook is not None:
            logits_hook(active, t, logits)
        probs = process_logits(logits, temperature, top_p)
        tok = probs.argmax(-1) if temperature == 0 else sample(probs, generator)
        out[active, t] = tok
        done = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if t == max_new_tokens - 1:
            done = torch.ones_like(done)
        if bool(done.any()):
            lengths[active[done]] = t + 1
            keep = (~done).nonzero().squeeze(1)
            active, tok, pos = active[keep], tok[keep], pos[keep]
            if active.numel() == 0:
                break
            cache.keep_rows(keep)
            cache.maybe_compact(0.3)
        cache.reserve(1)
        logits = cache.forward(tok[:, None], torch.ones_like(tok)[:, None], pos[:, None], logits_to_keep=1)[:, -1]
        pos = pos + 1
    _sync(dev)
    width = max(int(lengths.max()), 1)
    return GenResult(tokens=out[:, :width], lengths=lengths, time_total=time.perf_counter() - t0,
                     time_forward=prefill.seconds + cache.forward_time, num_calls=prefill.calls + cache.calls,
                     time_prefill=prefill.seconds)
