"""The training sequence of distillation (`Rollout`) and how one is put together (pure torch).

Below distillspec.rollout.sources (the samplers) and distillspec.rollout.teacher_cache (cached teacher data),
which both build Rollouts. Layout: the prompt (left-padded) followed by a right-padded completion, and the
completion lengths; logit position L-1+j predicts completion token j (L = padded prompt width), for j < length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distillspec.errors import ConfigError

__all__ = ["Rollout", "assemble", "fixed_completions"]


@dataclass
class Rollout:
    """input_ids (B, L+T), attention_mask (B, L+T), prompt_len L, lengths (B,) completion lengths,
    source: which data source produced it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    lengths: torch.Tensor
    source: str

    @property
    def completion_width(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    def completion_mask(self) -> torch.Tensor:
        """(B, T) bool: True for completion tokens up to and including the first EOS."""
        t = torch.arange(self.completion_width, device=self.lengths.device)
        return t[None, :] < self.lengths[:, None]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def assemble(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
             lengths: torch.Tensor, pad_id: int, source: str) -> Rollout:
    """Concatenate left-padded prompts (B, L) and right-padded completions (B, T) into a Rollout."""
    t = torch.arange(completion.shape[1], device=completion.device)
    comp_mask = (t[None, :] < lengths[:, None]).to(prompt_mask.dtype)
    completion = torch.where(comp_mask.bool(), completion, torch.full_like(completion, pad_id))
    return Rollout(input_ids=torch.cat([prompt_ids, completion], 1),
                   attention_mask=torch.cat([prompt_mask, comp_mask], 1),
                   prompt_len=prompt_ids.shape[1], lengths=lengths, source=source)


def fixed_completions(targets: Sequence[Sequence[int] | None], max_new_tokens: int, eos_id: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth completions (B, T) right-padded with EOS appended, truncated to max_new_tokens."""
    if any(t is None for t in targets):
        raise ConfigError("rollout.source=fixed needs dataset outputs, but this task's examples have no "
                          "target_text; use rollout=student or rollout=teacher")
    seqs = [list(t)[: max_new_tokens - 1] + [eos_id] for t in targets]
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), eos_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device), torch.tensor([len(s) for s in seqs], device=device)


@dataclass
class CachedCompletion:
    """One prompt's cached teacher data: tokens (T,) long, topk_idx (T, k) int32, topk_logp (T, k) float32
    (teacher log-probs at the objective's temperature of the k most likely tokens at each position),
    tail_logp (T,) float32 (log of the mass outside the top-k; -inf when k = V)."""

    tokens: torch.Tensor
    topk_idx: torch.Tensor
    topk_logp: torch.Tensor
    tail_logp: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])
