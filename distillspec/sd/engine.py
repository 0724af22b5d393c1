"""Batched speculative decoding with a per-row KV cache for both models (ragged acceptance, exact).

One block per step for every active row:
  1. the draft extends each row by gamma tokens (gamma forward calls of width 1, the first of width 2
     for rows whose previous block was fully accepted: the draft never saw its own last token);
  2. the target scores [last committed token, d_1..d_gamma] in one forward call (gamma + 1 positions);
  3. `verify_block` decides per row how many drafted tokens survive (n_i) and the token after them.
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
from dataclasses import dataclass
from typing import Sequence

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError, check_choice, check_number, check_temperature
from distillspec.sd.cache import _sync
from distillspec.sd.clock import ForwardTimer
from distillspec.sd.sampling import LENIENCES, entropy_from_logits, process_logits, sample, verify_block
from distillspec.sd.static_cache import check_kv_options, make_kv

ACCEPTANCE_MODES = ("rejection", "topk")
FIRST_TOKEN_MODES = C.FIRST_TOKEN_MODES


@dataclass
class SDResult:
    """Output of `SpeculativeDecoder.generate` for B prompts.

    tokens: (B, T) long generated tokens, right-padded with pad_token_id; lengths: (B,) valid counts
        (the EOS, when produced, is included). num_blocks / num_drafted / num_accepted: (B,) long per row
        (target verification calls, drafted tokens, accepted drafted tokens that were emitted).
    trace_*: (N,) one entry per drafted position of every block: row index, block index, position in
        block, accepted by the verification rule (and all earlier in the block; also where EOS or the token
        cap then cut the block, as vLLM's counters count them), first rejected in its block, p and q of the
        drafted token, target entropy (softmax of logits / T; T = 1 when greedy), exact acceptance probability
        sum_v min(p, q), and p(argmax q): the acceptance probability of a draft that proposes its argmax
        and is verified as if q were one-hot (vLLM's default draft_model scheme, PR #16899).
    time_*: seconds (total wall clock, draft forwards, target forwards, prefill forwards of both);
        num_draft_calls / num_target_calls: forward calls after prefill.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    num_blocks: torch.Tensor
    num_drafted: torch.Tensor
    num_accepted: torch.Tensor
    trace_row: torch.Tensor
    trace_block: torch.Tensor
    trace_pos: torch.Tensor
    trace_accepted: torch.Tensor
    trace_first_rejected: torch.Tensor
    trace_p: torch.Tensor
    trace_q: torch.Tensor
    trace_entropy: torch.Tensor
    trace_accept_prob: torch.Tensor
    trace_p_draft_argmax: torch.Tensor
    time_total: float = 0.0
    time_draft: float = 0.0
    time_target: float = 0.0
    time_prefill: float = 0.0
    num_draft_calls: int = 0
    num_target_calls: int = 0
    pad_token_id: int = 0


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
    """

    def __init__(self, draft, target, *, gamma: int = 5, temperature: float = 1.0, top_p: float = 1.0,
                 lenience: str = "none", epsilon: float = 1.0, acceptance: str = "rejection", top_k: int = 25,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = 0,
                 compact_at: float = 0.3, kv: str = "dynamic", compile: bool = False,
                 first_token: str = "draft") -> None:
        if not isinstance(gamma, int) or gamma < 1:
            raise ConfigError(f"gamma={gamma!r} is invalid; valid: an integer >= 1")
        check_temperature("temperature", temperature)
        check_number("top_p", top_p)
        check_number("epsilon", epsilon)
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"top_p={top_p} is invalid; valid: 0 < top_p <= 1")
        check_choice("acceptance", acceptance, ACCEPTANCE_MODES)
        check_choice("first_token", first_token, FIRST_TOKEN_MODES)
        check_choice("lenience", lenience, LENIENCES)
        if not 0.0 < epsilon <= 1.0:
            raise ConfigError(f"epsilon={epsilon} is invalid; valid: 0 < epsilon <= 1")
        vd, vt = _vocab(draft), _vocab(target)
        if vd != vt:
            raise ConfigError(f"draft and target vocabularies differ: draft {type(draft).__name__} has {vd} "
                              f"entries, target {type(target).__name__} has {vt}; SD needs a shared vocabulary")
        check_kv_options(kv, compile, (draft, target))
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
        dev, G, B = input_ids.device, self.gamma, input_ids.shape[0]
        mask = attention_mask.long()
        # static capacity: prompt columns + every committed token + one block of each model, + slack
        opts = dict(kv=self.kv, compile=self.compile, capacity=input_ids.shape[1] + max_new_tokens + 2 * (G + 1) + 8)
        tgt = make_kv(self.target, B, dev, role="target", **opts)
        drf = make_kv(self.draft, B, dev, role="draft", **opts)
        pos = mask.sum(1)  # valid tokens per row, including the pending (last committed) one
        posids = (mask.cumsum(1) - 1).clamp(min=0)
        prefill = self.first_token == "prefill"
        if prefill:  # both models read the whole prompt; the target's last logits give the first new token
            first_logits = tgt.forward(input_ids, mask, posids, logits_to_keep=1)[:, -1]
            drf.forward(input_ids, mask, posids, logits_to_keep=1)
        elif input_ids.shape[1] > 1:
            for kv in (tgt, drf):
                kv.forward(input_ids[:, :-1], mask[:, :-1], posids[:, :-1], logits_to_keep=1)
        prefill_timers = (tgt.timer, drf.timer)  # read at the end: no device wait here
        tgt.timer, drf.timer = ForwardTimer(dev), ForwardTimer(dev)
        last = input_ids[:, -1].clone()
        dprev = torch.full_like(last, self.pad_id)  # d_gamma of a fully accepted block (unseen by the draft)
        dprev_valid = torch.zeros_like(last)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        buf = torch.full((B, max_new_tokens + G + 1), self.pad_id, dtype=torch.long, device=dev)
        n_out = torch.zeros(B, dtype=torch.long, device=dev)
        active = torch.arange(B, device=dev)
        out_tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        out_len = torch.zeros(B, dtype=torch.long, device=dev)
        blocks = torch.zeros(B, dtype=torch.long, device=dev)
        accepted_total = torch.zeros(B, dtype=torch.long, device=dev)
        trace: list[tuple[torch.Tensor, ...]] = []
        ar = torch.arange(G + 1, device=dev)

        def retire(done: torch.Tensor) -> bool:
            """Move finished rows' outputs out of the batch; False when no row is left."""
            nonlocal active, buf, n_out, pos, last, dprev, dprev_valid
            rows = active[done]
            out_len[rows] = n_out[done].clamp(max=max_new_tokens)
            out_tokens[rows] = buf[done, :max_new_tokens]
            keep = (~done).nonzero().squeeze(1)
            active = active[keep]
            if active.numel() == 0:
                return False
            for kv in (tgt, drf):
                kv.keep_rows(keep)
            buf, n_out, pos, last = buf[keep], n_out[keep], pos[keep], last[keep]
            dprev, dprev_valid = dprev[keep], dprev_valid[keep]
            return True

        if prefill:
            last = self._pick(process_logits(first_logits, self.temperature, self.top_p), generator)
            buf[:, 0], n_out, pos = last, n_out + 1, pos + 1
            done = torch.isin(last, eos) | (n_out >= max_new_tokens)
            if bool(done.any()):
                retire(done)
        while active.numel() > 0:
            b = active.numel()
            # ---- 1. draft gamma tokens ----
            for kv in (tgt, drf):
                kv.reserve(G + 2)  # static caches compact here when full, never inside a block
            d_start = drf.width
            if bool(dprev_valid.any()):
                toks = torch.stack([dprev, last], 1)
                valid = torch.stack([dprev_valid, torch.ones_like(last)], 1)
                posn = torch.stack([(pos - 2).clamp(min=0), pos - 1], 1)
            else:
                toks, valid, posn = last[:, None], torch.ones_like(last)[:, None], (pos - 1)[:, None]
            lead = toks.shape[1]
            logits = drf.forward(toks, valid, posn, logits_to_keep=1)[:, -1]
            qs, ds = [], []
            for j in range(G):
                qj = process_logits(logits, self.temperature, self.top_p)
                dj = self._pick(qj, generator)
                qs.append(qj)
                ds.append(dj)
                if j < G - 1:
                    logits = drf.forward(dj[:, None], torch.ones_like(dj)[:, None], (pos + j)[:, None],
                                         logits_to_keep=1)[:, -1]
            q, d = torch.stack(qs, 1), torch.stack(ds, 1)
            # ---- 2. target scores the block in one call ----
            t_start_w = tgt.width
            t_logits = tgt.forward(torch.cat([last[:, None], d], 1), torch.ones(b, G + 1, dtype=torch.long, device=dev),
                                   pos[:, None] - 1 + ar[None, :], logits_to_keep=G + 1).float()
            p = process_logits(t_logits, self.temperature, self.top_p)
            v = verify_block(p, q, d, rule=self.rule, generator=generator, lenience=self.lenience,
                             epsilon=self.epsilon, top_k=self.top_k,
                             rank_scores=t_logits if self.rule == "topk" else None)
            n = v.num_accepted
            # ---- 3. emit n accepted tokens + 1 (SKD: + 0 after a fully accepted block) ----
            # SKD: the student proposes every token; the teacher only replaces a rejected one, so a fully
            # accepted block adds no teacher token and d_G becomes the pending token both models see next.
            full = (n == G) if self.rule == "topk" else torch.zeros_like(n, dtype=torch.bool)
            emitted = torch.cat([d, torch.full_like(last, self.pad_id)[:, None]], 1)
            emitted[torch.arange(b, device=dev), n] = v.next_token
            count = n + 1 - full.long()
            in_blk = ar[None, :] < count[:, None]
            is_eos = torch.isin(emitted, eos) & in_blk if eos.numel() else torch.zeros_like(in_blk)
            hit = is_eos.any(1)
            count = torch.where(hit, is_eos.float().argmax(1) + 1, count)
            emit = torch.minimum(count, max_new_tokens - n_out)  # tokens of this block that are output
            kept = torch.minimum(n, emit)  # accepted drafted tokens among them
            p_arg = p[:, :G].gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
            trace.append((active[:, None].expand(b, G), blocks[active][:, None].expand(b, G), ar[None, :G].expand(b, G),
                          v.accepted, v.first_rejected, v.p_tok, v.q_tok,
                          entropy_from_logits(t_logits[:, :G], self.temperature), v.accept_prob, p_arg))
            blocks[active] += 1
            accepted_total[active] += kept
            buf.scatter_(1, n_out[:, None] + ar[None, :], emitted)
            n_out = n_out + count
            done = hit | (n_out >= max_new_tokens)
            # ---- 4. roll caches back per row ----
            max_n = int(n.max())
            keep_t = n + 1 - full.long()  # target columns kept per row: [last, d_1..d_n], minus d_G if pending
            max_t = int(keep_t.max())
            tgt.crop(t_start_w + max_t)
            tgt.set_valid(t_start_w, (ar[None, :max_t] < keep_t[:, None]).long())
            keep_d = min(max_n, G - 1)
            drf.crop(d_start + lead + keep_d)
            if keep_d > 0:
                drf.set_valid(d_start + lead, (ar[None, 1: keep_d + 1] <= n[:, None]).long())
            bonus = (n == G) & ~full  # d_G was committed but not fed to the draft; the bonus token follows it
            dprev = torch.where(bonus, d[:, -1], torch.full_like(last, self.pad_id))
            dprev_valid = bonus.long()
            pos = pos + n + 1 - full.long()
            last = torch.where(full, d[:, -1], v.next_token)
            # ---- 5. retire finished rows ----
            if bool(done.any()) and not retire(done):
                break
            for kv in (tgt, drf):
                kv.maybe_compact(self.compact_at)
        _sync(dev)
        col = torch.arange(max_new_tokens, device=dev)[None, :]
        out_tokens = torch.where(col < out_len[:, None], out_tokens, torch.full_like(out_tokens, self.pad_id))
        width = max(int(out_len.max()), 1)
        fields = [torch.cat([t[i].reshape(-1) for t in trace]) if trace else _empty_trace(i, dev) for i in range(10)]
        return SDResult(tokens=out_tokens[:, :width], lengths=out_len, num_blocks=blocks,
                        num_drafted=blocks * G, num_accepted=accepted_total,
                        trace_row=fields[0], trace_block=fields[1], trace_pos=fields[2], trace_accepted=fields[3],
                        trace_first_rejected=fields[4], trace_p=fields[5], trace_q=fields[6],
                        trace_entropy=fields[7], trace_accept_prob=fields[8], trace_p_draft_argmax=fields[9],
                        time_total=time.perf_counter() - t_start, time_draft=drf.forward_time,
                        time_target=tgt.forward_time, time_prefill=sum(t.seconds for t in prefill_timers),
                        num_draft_calls=drf.calls, num_target_calls=tgt.calls, pad_token_id=self.pad_id)


def _empty_trace(i: int, device) -> torch.Tensor:
    """An empty trace field (no block ran: every row finished on its prefill token)."""
    dtype = torch.long if i < 3 else (torch.bool if i in (3, 4) else torch.float32)
    return torch.zeros(0, dtype=dtype, device=device)
