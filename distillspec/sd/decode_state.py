"""The state of one `SpeculativeDecoder.generate` call and its output (pure torch).

`DecodeState` holds the rows still decoding and the finished rows' outputs; `Block` one drafted block on its
way through draft, verify and commit; `BlockTrace` the per-drafted-position record of every block, which
becomes the trace_* fields of `SDResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from distillspec.sd.sampling import BlockVerdict, entropy_from_logits


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


@dataclass
class Block:
    """One block of the b active rows. d: (b, G) drafted tokens; q: (b, G, V) the draft distributions they
    were drawn from; d_start: draft cache width before the block; lead: draft columns read before d_1 (1, or
    2 with the previous block's d_G). Filled by verification: t_start (target cache width before it),
    t_logits / p (b, G+1, V) float32 target logits and processed probabilities, verdict (BlockVerdict);
    by the commit: full (b,) bool, SKD blocks kept whole (no target token follows them)."""

    d: torch.Tensor
    q: torch.Tensor
    d_start: int
    lead: int
    t_start: int = 0
    t_logits: torch.Tensor | None = None
    p: torch.Tensor | None = None
    verdict: BlockVerdict | None = None
    full: torch.Tensor | None = None


@dataclass
class BlockTrace:
    """One entry per drafted position: (b, G) for a block, (N,) flattened over a run (the trace_* fields of
    SDResult, which documents them). row, block, pos: long; accepted, first_rejected: bool; p, q, entropy,
    accept_prob, p_draft_argmax: float32."""

    row: torch.Tensor
    block: torch.Tensor
    pos: torch.Tensor
    accepted: torch.Tensor
    first_rejected: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    entropy: torch.Tensor
    accept_prob: torch.Tensor
    p_draft_argmax: torch.Tensor

    @classmethod
    def of_block(cls, st: DecodeState, blk: Block, temperature: float) -> BlockTrace:
        b, G = blk.d.shape
        v = blk.verdict
        p_arg = blk.p[:, :G].gather(-1, blk.q.argmax(-1, keepdim=True)).squeeze(-1)
        return cls(row=st.active[:, None].expand(b, G), block=st.blocks[st.active][:, None].expand(b, G),
                   pos=torch.arange(G, device=blk.d.device)[None, :].expand(b, G), accepted=v.accepted,
                   first_rejected=v.first_rejected, p=v.p_tok, q=v.q_tok,
                   entropy=entropy_from_logits(blk.t_logits[:, :G], temperature), accept_prob=v.accept_prob,
                   p_draft_argmax=p_arg)

    @classmethod
    def concat(cls, traces: Sequence[BlockTrace], device) -> BlockTrace:
        """The blocks' traces flattened and concatenated (empty tensors when no block ran)."""
        names = [f.name for f in fields(cls)]
        if traces:
            return cls(**{k: torch.cat([getattr(t, k).reshape(-1) for t in traces]) for k in names})
        dtypes = {"row": torch.long, "block": torch.long, "pos": torch.long, "accepted": torch.bool,
                  "first_rejected": torch.bool}
        return cls(**{k: torch.zeros(0, dtype=dtypes.get(k, torch.float32), device=device) for k in names})

    def as_result_fields(self) -> dict:
        return {f"trace_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass
class DecodeState:
    """Decoding state of one `generate` call.

    Active rows (b of them; rows leave as they finish): active (b,) long batch indices; last (b,) the pending
    token (committed, not yet read by the target); pos (b,) valid tokens per row, the pending one included;
    dprev, dprev_valid (b,) the d_gamma of a fully accepted block, which the draft has not read; buf
    (b, max_new_tokens + G + 1) and n_out (b,) the tokens emitted so far.
    Per batch row (B): out_tokens (B, max_new_tokens), out_len, blocks, accepted (long). traces: BlockTraces.
    eos: (E,) long EOS ids. max_new_tokens: the token cap.
    """

    active: torch.Tensor
    last: torch.Tensor
    pos: torch.Tensor
    dprev: torch.Tensor
    dprev_valid: torch.Tensor
    buf: torch.Tensor
    n_out: torch.Tensor
    out_tokens: torch.Tensor
    out_len: torch.Tensor
    blocks: torch.Tensor
    accepted: torch.Tensor
    eos: torch.Tensor
    max_new_tokens: int
    traces: list[BlockTrace] = field(default_factory=list)

    @classmethod
    def start(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, gamma: int,
              pad_id: int, eos_ids: Sequence[int] = ()) -> DecodeState:
        B, dev = input_ids.shape[0], input_ids.device
        last = input_ids[:, -1].clone()
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        return cls(active=torch.arange(B, device=dev), last=last, pos=attention_mask.long().sum(1),
                   dprev=torch.full_like(last, pad_id), dprev_valid=torch.zeros_like(last),
                   buf=torch.full((B, max_new_tokens + gamma + 1), pad_id, dtype=torch.long, device=dev),
                   n_out=zeros.clone(), out_tokens=torch.full((B, max_new_tokens), pad_id, dtype=torch.long,
                                                              device=dev),
                   out_len=zeros.clone(), blocks=zeros.clone(), accepted=zeros.clone(),
                   eos=torch.tensor(list(eos_ids), dtype=torch.long, device=dev), max_new_tokens=max_new_tokens)

    def retire(self, done: torch.Tensor, caches) -> bool:
        """Move finished rows' (done (b,) bool) outputs out of the batch and drop them from the active state
        and `caches`; False when no row is left."""
        rows = self.active[done]
        self.out_len[rows] = self.n_out[done].clamp(max=self.max_new_tokens)
        self.out_tokens[rows] = self.buf[done, : self.max_new_tokens]
        keep = (~done).nonzero().squeeze(1)
        self.active = self.active[keep]
        if self.active.numel() == 0:
            return False
        for kv in caches:
            kv.keep_rows(keep)
        for name in ("buf", "n_out", "pos", "last", "dprev", "dprev_valid"):
            setattr(self, name, getattr(self, name)[keep])
        return True

    def result(self, gamma: int, pad_id: int, **timings) -> SDResult:
        """The SDResult of the finished decoding (timings: SDResult's time_* and num_*_calls)."""
        col = torch.arange(self.max_new_tokens, device=self.out_tokens.device)[None, :]
        tokens = torch.where(col < self.out_len[:, None], self.out_tokens, torch.full_like(self.out_tokens, pad_id))
        width = max(int(self.out_len.max()), 1)
        trace = BlockTrace.concat(self.traces, self.out_tokens.device)
        return SDResult(tokens=tokens[:, :width], lengths=self.out_len, num_blocks=self.blocks,
                        num_drafted=self.blocks * gamma, num_accepted=self.accepted, pad_token_id=pad_id,
                        **trace.as_result_fields(), **timings)
