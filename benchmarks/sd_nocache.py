"""Batched SD without a KV cache: every forward re-encodes each row's whole prefix (left-padded).

This is how the reference study's evaluator handled ragged acceptance. It is (a) the baseline the cached
engine is benchmarked against (`benchmarks/bench_sd.py`) and (b) an independent oracle in the tests (same
verification math, no cache bookkeeping; `from benchmarks.sd_nocache import generate_nocache`). Returns
the engine's `SDResult` without traces (empty trace tensors).
"""

from __future__ import annotations

import time

import torch

from distillspec.sd.cache import _sync
from distillspec.sd.clock import ForwardTimer, TimedCalls
from distillspec.sd.engine import SDResult, SpeculativeDecoder, check_prompts
from distillspec.sd.sampling import process_logits, verify_block


def _left_pad(seqs: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - s.numel():] = s
        mask[i, width - s.numel():] = 1
    return ids, mask


class _Timed(TimedCalls):
    def __init__(self, model, device):
        self.model, self.timer = model, ForwardTimer(device)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        self.timer.start()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                         use_cache=False, logits_to_keep=keep).logits
        self.timer.stop()
        return out


@torch.no_grad()
def generate_nocache(dec: SpeculativeDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, generator: torch.Generator | None = None) -> SDResult:
    """Same decoding as `dec.generate` (same settings and verification), recomputing prefixes every call."""
    check_prompts(input_ids, attention_mask, max_new_tokens, (dec.draft, dec.target), dec.gamma + 1)
    t_start = time.perf_counter()
    dev, G, B = input_ids.device, dec.gamma, input_ids.shape[0]
    draft, target = _Timed(dec.draft, dev), _Timed(dec.target, dev)
    seqs = [input_ids[i][attention_mask[i].bool()] for i in range(B)]
    outs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    blocks = torch.zeros(B, dtype=torch.long)
    accepted = torch.zeros(B, dtype=torch.long)
    eos = set(dec.eos_ids)
    if dec.first_token == "prefill":  # the target's prefill samples the first new token (vLLM's alignment)
        ids, mask = _left_pad(seqs, dec.pad_id)
        first = dec._pick(process_logits(target(ids, mask, 1)[:, -1].float(), dec.temperature, dec.top_p), generator)
        for i in range(B):
            outs[i].append(int(first[i]))
            seqs[i] = torch.cat([seqs[i], first[i : i + 1]])
            done[i] = int(first[i]) in eos or max_new_tokens <= 1
    while not all(done):
        act = [i for i in range(B) if not done[i]]
        cur = [seqs[i] for i in act]
        qs, ds = [], []
        for _ in range(G):
            ids, mask = _left_pad(cur, dec.pad_id)
            q = process_logits(draft(ids, mask, 1)[:, -1], dec.temperature, dec.top_p)
            tok = dec._pick(q, generator)
            qs.append(q)
            ds.append(tok)
            cur = [torch.cat([c, t[None]]) for c, t in zip(cur, tok)]
        ids, mask = _left_pad(cur, dec.pad_id)
        t_logits = target(ids, mask, G + 1).float()
        p = process_logits(t_logits, dec.temperature, dec.top_p)
        d = torch.stack(ds, 1)
        v = verify_block(p, torch.stack(qs, 1), d, rule=dec.rule, generator=generator, lenience=dec.lenience,
                         epsilon=dec.epsilon, top_k=dec.top_k, rank_scores=t_logits if dec.rule == "topk" else None)
        for r, i in enumerate(act):
            n = int(v.num_accepted[r])
            blocks[i] += 1
            skd_full = dec.rule == "topk" and n == G  # SKD: no target token after a fully kept block
            new = d[r, :n].tolist() + ([] if skd_full else [int(v.next_token[r])])
            for k, t in enumerate(new):
                outs[i].append(t)
                accepted[i] += int(k < n)  # only accepted drafted tokens that are emitted count
                if t in eos or len(outs[i]) >= max_new_tokens:
                    done[i] = True
                    break
            seqs[i] = torch.cat([seqs[i], torch.tensor(new, dtype=torch.long, device=dev)])
    _sync(dev)
    lengths = torch.tensor([len(o) for o in outs], dtype=torch.long)
    tokens = torch.full((B, max(int(lengths.max()), 1)), dec.pad_id, dtype=torch.long)
    for i, o in enumerate(outs):
        tokens[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    empty_l, empty_f = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return SDResult(tokens=tokens, lengths=lengths, num_blocks=blocks, num_drafted=blocks * G, num_accepted=accepted,
                    trace_row=empty_l, trace_block=empty_l, trace_pos=empty_l,
                    trace_accepted=empty_l.bool(), trace_first_rejected=empty_l.bool(), trace_p=empty_f,
                    trace_q=empty_f, trace_entropy=empty_f, trace_accept_prob=empty_f, trace_p_draft_argmax=empty_f,
                    time_total=time.perf_counter() - t_start, time_draft=draft.forward_time, time_target=target.forward_time,
                    num_draft_calls=draft.calls, num_target_calls=target.calls, pad_token_id=dec.pad_id)
