"""Teacher data from a served teacher (vLLM over HTTP, `distillspec.serving.client`): the same entries
`TeacherCache` computes in-process, in its format (`CachedCompletion`).

  * teacher samples (`source="teacher"`): vLLM samples each prompt's completion at the rollout's T and top-p
    and returns, at every sampled position, the top-k log-probs of the raw teacher distribution (vLLM's
    default `logprobs_mode=raw_logprobs`: temperature 1, before top-p), which is what the sparse loss uses;
  * dataset outputs (`source="fixed"`): the teacher scores prompt + output (`prompt_logprobs`).

vLLM's log-probs are the model's at temperature 1 (prompt log-probs always are), so a served teacher serves
loss temperature 1 only; `check_loss_temperature` refuses anything else before any work. The tail mass outside
the top-k is 1 − Σ top-k (log1mexp of their log-sum-exp), clamped where rounding pushes Σ over 1.
Requests carry no per-request seed: vLLM 0.32's CPU engine dies on a seeded request whose prompt is prefilled
in chunks (`tools/vllm_seed_fault.py`); the server's own `--seed` is what there is, so served
samples are reproducible for a fresh server and the same request order only. The teacher-data store keeps
them (its key records the engine and vLLM's version), so a resumed run reloads the same data.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from distillspec.errors import ConfigError, EngineError
from distillspec.rollout.sequences import CachedCompletion, fixed_completions


def check_loss_temperature(temperature: float) -> None:
    """ConfigError unless the loss temperature is 1 (what vLLM's log-probs are taken at)."""
    if float(temperature) != 1.0:
        raise ConfigError(f"div.temperature={temperature!r} with a served teacher (rollout.engine=vllm): vLLM's "
                          "log-probs are the teacher's at temperature 1 (prompt log-probs ignore logprobs_mode), "
                          "and top-k log-probs at T = 1 cannot be rescaled to another temperature without the "
                          "whole vocabulary; use div.temperature=1, or rollout.engine=hf")


def _entry(tokens: Sequence[int], rows: Sequence[dict[int, float]], top_k: int) -> CachedCompletion:
    """tokens (T,), rows: per position {token id: log-prob} (at least top_k entries) -> a CachedCompletion with
    the top_k ids sorted by log-prob (ties by id) and the log of the mass outside them."""
    if len(rows) != len(tokens):
        raise EngineError(f"vLLM returned log-probs for {len(rows)} of {len(tokens)} positions")
    idx = torch.zeros(len(tokens), top_k, dtype=torch.int32)
    val = torch.zeros(len(tokens), top_k, dtype=torch.float32)
    tail = torch.zeros(len(tokens), dtype=torch.float32)
    for t, row in enumerate(rows):
        if len(row) < top_k:
            raise EngineError(f"vLLM returned {len(row)} log-probs at a position, fewer than the {top_k} asked for "
                              "(is the server's --max-logprobs below rollout.cache_top_k?)")
        best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        idx[t] = torch.tensor([i for i, _ in best], dtype=torch.int32)
        val[t] = torch.tensor([v for _, v in best], dtype=torch.float32)
        kept = torch.logsumexp(torch.tensor([v for _, v in best], dtype=torch.float64), 0).item()
        tail[t] = math.log(-math.expm1(kept)) if kept < 0 else float("-inf")
    return CachedCompletion(tokens=torch.tensor(list(tokens), dtype=torch.long), topk_idx=idx, topk_logp=val,
                            tail_logp=tail)


def scored_entries(client, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                   top_k: int) -> list[CachedCompletion]:
    """The served teacher's top-k log-probs (prompt_logprobs, temperature 1) of each completion given its prompt:
    one CachedCompletion per (prompt, completion) pair, its position j the distribution that predicts
    completion token j. One request for all pairs (EngineClient.score)."""
    seqs = [[int(t) for t in p] + [int(t) for t in c] for p, c in zip(prompts, completions)]
    return [_entry(seq[len(p):], rows[len(p):], top_k)
            for p, seq, rows in zip(prompts, seqs, client.score(seqs, top_k))]


def served_entries(client, items: Sequence, source: str, *, top_k: int, sample_temperature: float, top_p: float,
                   max_new_tokens: int, eos_ids: list[int], batch_size: int,
                   progress: bool = True) -> dict[int, CachedCompletion]:
    """{item index: CachedCompletion} for every item, from the served teacher `client` (an EngineClient).

    items: encoded prompts (`.input_ids`, `.target_ids`); source: "teacher" or "fixed"."""
    from tqdm.auto import tqdm

    if source not in ("teacher", "fixed"):
        raise ValueError(f"a served teacher builds the 'teacher' and 'fixed' sources, not {source!r}")
    out: dict[int, CachedCompletion] = {}
    what = "teacher rollouts (vLLM)" if source == "teacher" else "teacher scores of dataset outputs (vLLM)"
    bar = tqdm(total=len(items), desc=f"{what} (once, cached)", unit="prompt", disable=not progress, leave=False)
    try:
        for start in range(0, len(items), batch_size):
            idx = list(range(start, min(start + batch_size, len(items))))
            prompts = [list(map(int, items[i].input_ids)) for i in idx]
            if source == "teacher":
                samples = client.sample(prompts, temperature=sample_temperature, top_p=top_p, max_tokens=max_new_tokens,
                                        top_k_logprobs=top_k, stop_token_ids=eos_ids)
                for i, s in zip(idx, samples):
                    out[i] = _entry(s.tokens, s.top_logprobs, top_k)
            else:
                comp, lengths = fixed_completions([items[i].target_ids for i in idx], max_new_tokens, eos_ids[0],
                                                  torch.device("cpu"))
                completions = [comp[r, : int(lengths[r])].tolist() for r in range(len(idx))]
                out.update(zip(idx, scored_entries(client, prompts, completions, top_k)))
            bar.update(len(idx))
    finally:
        bar.close()
    return out
