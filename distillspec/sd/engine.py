"""Batched speculative decoding with a per-row KV cache for both models (ragged acceptance, exact).

One block per step for every active row, each step a method over the explicit `DecodeState`:
  1. `_draft`: the draft extends each row by gamma tokens (gamma forward calls of width 1, the first of
     width 2 for rows whose previous block was fully accepted: the draft never saw its own last token);
  2. `_verify`: the target scores [last committed token, d_1..d_gamma] in one forward call (gamma + 1
     positions) and `verify_block` decides per row how many drafted tokens survive (n_i) and the token after;
  3. `_commit`: each row emits its accepted tokens and the next one (cut at EOS / max_new_tokens);
  4. `_rollback`: both caches drop the rejected columns per row; finished rows retire.
Each row keeps its own accepted length: rejected cache columns become holes in that row's attention
mask (see `RaggedKV`), the tail invalid for every row is cropped, nothing accepted is recomputed.
Finished rows (EOS or max_new_tokens) are removed from the batch and both caches (kv="dynamic"), or stay
in the fixed-shape static caches with their results ignored (kv="static", see `static_cache.StaticKV`).
Forward calls are timed without a device synchronisation per call (`clock.ForwardTimer`).

first_token="draft" (default) starts drafting right after the prompt: the first block drafts the first new
token. first_token="prefill" is the block alignment of serving engines such as vLLM: the target's prefill
samples the first new token, and blocks start after it (same distribution, blocks shifted by one token).
num_accepted counts only drafted tokens that are emitted (a block cut by EOS or max_new_tokens counts the
accepted tokens before the cut), so accepted <= output tokens per row; the trace keeps every verification
outcome (vLLM's counters count accepted tokens that the cut then drops).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.sd.cache import _sync
from distillspec.sd.clock import ForwardTimer
from distillspec.sd.decode_state import Block, BlockTrace, DecodeState, SDResult  # noqa: F401 (SDResult: public here)
from distillspec.sd.masks import check_decodable
from distillspec.sd.sampling import process_logits, sample, verify_block
from distillspec.sd.static_cache import check_kv_options, make_kv

FIRST_TOKEN_MODES = C.FIRST_TOKEN_MODES


def _vocab(model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  models: Sequence, extra: int = 0) -> None:
    """Raise ConfigError for empty/unpadded batches or prompts that do not fit the models' context."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[1] == 0:
        raise ConfigError(f"prompts must be (B, L) with L >= 1 and a mask of the same shape, got "
                          f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ConfigError("prompts must be left-padded (the last column of attention_mask must be all 1)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid; valid: >= 1")
    longest = int(attention_mask.sum(1).max())
    for m in models:
        limit = context_limit(m)
        if limit is not None and longest + max_new_tokens + extra > limit:
            raise ConfigError(f"prompt of {longest} tokens + {max_new_tokens} new tokens (+{extra} lookahead) "
                              f"exceeds the context of {type(m).__name__} ({limit} positions); shorten the "
                              f"prompt (task.max_prompt_tokens) or the generation")


class SpeculativeDecoder:
    """Draft-then-verify decoding of a left-padded batch.

    Args:
        draft, target: HF causal LMs sharing a vocabulary, on the same device, in eval mode.
        gamma: drafted tokens per block (>= 1). temperature, top_p: sampling of both models (0 = greedy,
            verified by argmax). lenience, epsilon: lossy SD, f(p, eps) in LENIENCES. acceptance:
            "rejection" (SD) or "topk" (SKD: keep drafted tokens inside the target's top_k, replace the
            first one outside by a target sample; no target token after a fully kept block; at T = 0
            greedy proposals and greedy replacements). eos_token_id: int or list. pad_token_id: padding.
        compact_at: hole fraction of a cache above which it is compacted.
        kv: "dynamic" (RaggedKV: growing DynamicCache, finished rows removed) or "static" (StaticKV:
            preallocated, fixed shapes per call width). compile: kv="static" only, CUDA only: the decoding
            calls run through torch.compile(mode="reduce-overhead") (CUDA graphs); ConfigError elsewhere.
        first_token: "draft" (blocks start after the prompt) or "prefill" (the target's prefill samples the
            first new token, as in vLLM; blocks start after it). Same output distribution either way.
    The settings' values are validated where users set them (distillspec.specs: SDSpec, RolloutSpec); this
    class checks what depends on the models: a shared vocabulary, the KV cache options on their device.
    """

    def __init__(self, draft, target, *, gamma: int = 5, temperature: float = 1.0, top_p: float = 1.0,
                 lenience: str = "none", epsilon: float = 1.0, acceptance: str = "rejection", top_k: int = 25,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = 0,
                 compact_at: float = 0.3, kv: str = "dynamic", compile: bool = False,
                 first_token: str = "draft") -> None:
        vd, vt = _vocab(draft), _vocab(target)
        if vd != vt:
            raise ConfigError(f"draft and target vocabularies differ: draft {type(draft).__name__} has {vd} "
                              f"entries, target {type(target).__name__} has {vt}; SD needs a shared vocabulary")
        for m in (draft, target):
            check_decodable(m)  # layer types the caches support (distillspec.sd.support)
        check_kv_options(kv, compile, (draft, target))  # the cache each model can use on its device
        self.kv, self.compile, self.first_token = kv, compile, first_token
        self.draft, self.target = draft, target
        self.gamma, self.temperature, self.top_p = gamma, float(temperature), float(top_p)
        self.lenience, self.epsilon = lenience, float(epsilon)
        # SKD keeps its top-k rule at T = 0 too (greedy proposals, greedy replacements outside the top-k);
        # rank_scores (raw target logits) keep the top-k set from collapsing to the argmax.
        self.rule = "greedy" if temperature == 0 and acceptance != "topk" else acceptance
        self.top_k = top_k
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos_ids = [int(e) for e in eos]
        self.pad_id = int(pad_token_id if pad_token_id is not None else (self.eos_ids or [0])[0])
        self.compact_at = compact_at

    def _pick(self, probs: torch.Tensor, generator) -> torch.Tensor:
        return probs.argmax(-1) if self.temperature == 0 else sample(probs, generator)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 generator: torch.Generator | None = None) -> SDResult:
        """input_ids, attention_mask: (B, L) left-padded prompts on the models' device."""
        check_prompts(input_ids, attention_mask, max_new_tokens, (self.draft, self.target), self.gamma + 1)
        check_kv_options(self.kv, self.compile, (self.draft, self.target), input_ids.device)
        t_start = time.perf_counter()
        dev, B = input_ids.device, input_ids.shape[0]
        # static capacity: prompt columns + every committed token + one block of each model, + slack
        opts = dict(kv=self.kv, compile=self.compile,
                    capacity=input_ids.shape[1] + max_new_tokens + 2 * (self.gamma + 1) + 8)
        tgt = make_kv(self.target, B, dev, role="target", **opts)
        drf = make_kv(self.draft, B, dev, role="draft", **opts)
        st = DecodeState.start(input_ids, attention_mask, max_new_tokens, self.gamma, self.pad_id, self.eos_ids)
        first_logits = self._prefill(st, tgt, drf, input_ids, attention_mask.long())
        prefill_timers = (tgt.timer, drf.timer)  # read at the end: no device wait here
        tgt.timer, drf.timer = ForwardTimer(dev), ForwardTimer(dev)
        if first_logits is not None:
            self._emit_first(st, first_logits, (tgt, drf), generator)
        while st.active.numel() > 0:
            for kv in (tgt, drf):
                kv.reserve(self.gamma + 2)  # static caches compact here when full, never inside a block
            blk = self._draft(st, drf, generator)
            self._verify(st, tgt, blk, generator)
            done = self._commit(st, blk)
            self._rollback(st, tgt, drf, blk)
            if bool(done.any()) and not st.retire(done, (tgt, drf)):
                break
            for kv in (tgt, drf):
                kv.maybe_compact(self.compact_at)
        _sync(dev)
        return st.result(self.gamma, self.pad_id, time_total=time.perf_counter() - t_start,
                         time_draft=drf.forward_time, time_target=tgt.forward_time,
                         time_prefill=sum(t.seconds for t in prefill_timers), num_draft_calls=drf.calls,
                         num_target_calls=tgt.calls)

    def _prefill(self, st: DecodeState, tgt, drf, input_ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor | None:
        """Both caches read the prompt: all of it with first_token="prefill" (returns the target's last logits
        (B, V), which give the first new token), else all but the pending last token (returns None)."""
        posids = (mask.cumsum(1) - 1).clamp(min=0)
        if self.first_token == "prefill":
            first_logits = tgt.forward(input_ids, mask, posids, logits_to_keep=1)[:, -1]
            drf.forward(input_ids, mask, posids, logits_to_keep=1)
            return first_logits
        if input_ids.shape[1] > 1:
            for kv in (tgt, drf):
                kv.forward(input_ids[:, :-1], mask[:, :-1], posids[:, :-1], logits_to_keep=1)
        return None

    def _emit_first(self, st: DecodeState, first_logits: torch.Tensor, caches, generator) -> None:
        """first_token="prefill": the target's prefill logits (B, V) give every row its first new token."""
        st.last = self._pick(process_logits(first_logits, self.temperature, self.top_p), generator)
        st.buf[:, 0], st.n_out, st.pos = st.last, st.n_out + 1, st.pos + 1
        done = torch.isin(st.last, st.eos) | (st.n_out >= st.max_new_tokens)
        if bool(done.any()):
            st.retire(done, caches)

    def _draft(self, st: DecodeState, drf, generator) -> Block:
        """The draft proposes gamma tokens per active row: gamma forward calls of width 1 (the first of width 2
        for rows whose previous block was fully accepted: the draft has not read that block's d_gamma)."""
        G, d_start = self.gamma, drf.width
        if bool(st.dprev_valid.any()):
            toks = torch.stack([st.dprev, st.last], 1)
            valid = torch.stack([st.dprev_valid, torch.ones_like(st.last)], 1)
            posn = torch.stack([(st.pos - 2).clamp(min=0), st.pos - 1], 1)
        else:
            toks, valid, posn = st.last[:, None], torch.ones_like(st.last)[:, None], (st.pos - 1)[:, None]
        logits = drf.forward(toks, valid, posn, logits_to_keep=1)[:, -1]
        qs, ds = [], []
        for j in range(G):
            qj = process_logits(logits, self.temperature, self.top_p)
            dj = self._pick(qj, generator)
            qs.append(qj)
            ds.append(dj)
            if j < G - 1:
                logits = drf.forward(dj[:, None], torch.ones_like(dj)[:, None], (st.pos + j)[:, None],
                                     logits_to_keep=1)[:, -1]
        return Block(d=torch.stack(ds, 1), q=torch.stack(qs, 1), d_start=d_start, lead=toks.shape[1])

    def _verify(self, st: DecodeState, tgt, blk: Block, generator) -> None:
        """The target scores [pending token, d_1..d_gamma] in one call; `verify_block` decides per row how many
        drafted tokens survive and the token after them. Fills blk.t_start, t_logits, p and verdict."""
        b, G = blk.d.shape
        blk.t_start = tgt.width
        ar = torch.arange(G + 1, device=blk.d.device)
        blk.t_logits = tgt.forward(torch.cat([st.last[:, None], blk.d], 1),
                                   torch.ones(b, G + 1, dtype=torch.long, device=blk.d.device),
                                   st.pos[:, None] - 1 + ar[None, :], logits_to_keep=G + 1).float()
        blk.p = process_logits(blk.t_logits, self.temperature, self.top_p)
        blk.verdict = verify_block(blk.p, blk.q, blk.d, rule=self.rule, generator=generator,
                                   lenience=self.lenience, epsilon=self.epsilon, top_k=self.top_k,
                                   rank_scores=blk.t_logits if self.rule == "topk" else None)

    def _commit(self, st: DecodeState, blk: Block) -> torch.Tensor:
        """Emit each row's n accepted tokens + 1 (SKD: + 0 after a fully accepted block), cut at EOS and at
        max_new_tokens; record the block's trace and counts. Returns done (b,) bool: rows that finished."""
        b, G = blk.d.shape
        v, ar = blk.verdict, torch.arange(G + 1, device=blk.d.device)
        n = v.num_accepted
        # SKD: the student proposes every token; the teacher only replaces a rejected one, so a fully
        # accepted block adds no teacher token and d_G becomes the pending token both models see next.
        blk.full = (n == G) if self.rule == "topk" else torch.zeros_like(n, dtype=torch.bool)
        emitted = torch.cat([blk.d, torch.full_like(st.last, self.pad_id)[:, None]], 1)
        emitted[torch.arange(b, device=blk.d.device), n] = v.next_token
        count = n + 1 - blk.full.long()
        in_blk = ar[None, :] < count[:, None]
        is_eos = torch.isin(emitted, st.eos) & in_blk if st.eos.numel() else torch.zeros_like(in_blk)
        hit = is_eos.any(1)
        count = torch.where(hit, is_eos.float().argmax(1) + 1, count)
        emit = torch.minimum(count, st.max_new_tokens - st.n_out)  # tokens of this block that are output
        st.traces.append(BlockTrace.of_block(st, blk, self.temperature))
        st.blocks[st.active] += 1
        st.accepted[st.active] += torch.minimum(n, emit)  # accepted drafted tokens among the output ones
        st.buf.scatter_(1, st.n_out[:, None] + ar[None, :], emitted)
        st.n_out = st.n_out + count
        return hit | (st.n_out >= st.max_new_tokens)

    def _rollback(self, st: DecodeState, tgt, drf, blk: Block) -> None:
        """Roll both caches back per row to the committed tokens (rejected columns become holes, the tail
        invalid for every row is cropped) and move every row's pending token and position forward."""
        G = self.gamma
        n, full, ar = blk.verdict.num_accepted, blk.full, torch.arange(G + 1, device=blk.d.device)
        keep_t = n + 1 - full.long()  # target columns kept per row: [last, d_1..d_n], minus d_G if pending
        max_t = int(keep_t.max())
        tgt.crop(blk.t_start + max_t)
        tgt.set_valid(blk.t_start, (ar[None, :max_t] < keep_t[:, None]).long())
        keep_d = min(int(n.max()), G - 1)
        drf.crop(blk.d_start + blk.lead + keep_d)
        if keep_d > 0:
            drf.set_valid(blk.d_start + blk.lead, (ar[None, 1: keep_d + 1] <= n[:, None]).long())
        bonus = (n == G) & ~full  # d_G was committed but not fed to the draft; the bonus token follows it
        st.dprev = torch.where(bonus, blk.d[:, -1], torch.full_like(st.last, self.pad_id))
        st.dprev_valid = bonus.long()
        st.pos = st.pos + n + 1 - full.long()
        st.last = torch.where(full, blk.d[:, -1], blk.verdict.next_token)
