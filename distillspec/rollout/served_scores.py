"""On-policy teacher scores from the vLLM teacher server (rollout.teacher_location=server): a Rollout becomes the
SparseRollout the sparse loss trains on, and the teacher never runs in this process (pure torch, no Lightning).

Each row's unpadded prompt + completion (up to its length, the EOS included) goes to the server in one request
(`EngineClient.score`, vLLM's `prompt_logprobs`); the top-k log-probs at every completion position are turned into
the teacher cache's entries by the same code that scores dataset outputs (`served_teacher.scored_entries`): ids
sorted by log-prob (ties by id), the tail as log(1 - Σ top-k). Positions past a row's length are zero-filled, as
`TeacherCache.rollout` fills them (the completion mask is False there). Log-probs are the teacher's at temperature
1 (vLLM's prompt log-probs), the loss temperature a served teacher supports.
"""

from __future__ import annotations

import torch

from distillspec.rollout.sequences import Rollout
from distillspec.rollout.served_teacher import scored_entries
from distillspec.rollout.teacher_cache import SparseRollout

__all__ = ["ServedScores", "rollout_rows"]


def rollout_rows(rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, completions): each row's prompt without its left padding and completion up to its length."""
    L = rollout.prompt_len
    ids, mask = rollout.input_ids.cpu(), rollout.attention_mask.cpu()
    prompts = [ids[b, :L][mask[b, :L].bool()].tolist() for b in range(ids.shape[0])]
    completions = [ids[b, L: L + int(n)].tolist() for b, n in enumerate(rollout.lengths.cpu())]
    return prompts, completions


class ServedScores:
    """Callable Rollout -> SparseRollout (topk_idx (B, T, k) long, topk_logp (B, T, k) and tail_logp (B, T)
    float32, T = the rollout's completion width) from `client` (an EngineClient of the teacher server).

    top_k: log-probs kept per position (rollout.cache_top_k, at most the vocabulary)."""

    def __init__(self, client, top_k: int) -> None:
        self.client, self.top_k = client, int(top_k)

    def __call__(self, rollout: Rollout) -> SparseRollout:
        prompts, completions = rollout_rows(rollout)
        entries = scored_entries(self.client, prompts, completions, self.top_k)
        B, T, k = len(entries), rollout.completion_width, self.top_k
        t_idx = torch.zeros(B, T, k, dtype=torch.long)
        t_val = torch.zeros(B, T, k, dtype=torch.float32)
        t_tail = torch.zeros(B, T, dtype=torch.float32)
        for r, e in enumerate(entries):
            t_idx[r, : e.length] = e.topk_idx.long()
            t_val[r, : e.length] = e.topk_logp
            t_tail[r, : e.length] = e.tail_logp
        dev = rollout.input_ids.device
        return SparseRollout(**vars(rollout), topk_idx=t_idx.to(dev), topk_logp=t_val.to(dev),
                             tail_logp=t_tail.to(dev))
