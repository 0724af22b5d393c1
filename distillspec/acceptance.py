"""Expected acceptance of a draft from two distributions, teacher-forced (pure torch).

At one position, speculative decoding accepts a token drawn from the draft's processed distribution q with
probability sum_v min(p(v), q(v)) = 1 - TV(p, q) (Leviathan et al. 2023), p the target's processed distribution
(temperature, then nucleus top-p; temperature 0: one-hot argmax). Averaged over positions this is alpha_expected.
Here p comes from stored top-k target log-probs, and q from the draft's logits:

  * `target_processed`: top-k log-probs at the SD temperature (sorted descending) -> p on those k ids. Exact where
    the nucleus lies inside the top k (its mass reaches top_p there); `complete` marks those positions. With
    top_p = 1 the nucleus is the whole vocabulary: p is exact on the k ids and the rest is left out, so the
    acceptance is a lower bound, short by at most min(tail_p, tail_q) (`tail_gap`).
  * `draft_processed_at`: the draft's processed q (distillspec.sd.sampling.process_logits, as SD draws) at the k ids,
    and its mass outside them.
  * `position_acceptance`: sum over the k ids of min(p, q).
  * `prompt_sums`: per-prompt sums and counts over masked positions, the parts of a ratio estimate whose bootstrap
    resamples prompts (distillspec.sd.metrics.bootstrap_ci).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillspec.sd.sampling import process_logits

__all__ = ["draft_processed_at", "position_acceptance", "prompt_sums", "target_processed"]


def target_processed(topk_logp: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """(N, k) target log-probs at `temperature` of its k most likely tokens, sorted descending -> ((N, k) float32
    processed probabilities p on those ids, (N,) bool complete: p is the exact processed distribution).

    temperature 0: one-hot on the first id (the log-probs were stored at temperature 1, any positive one works).
    top_p < 1: the nucleus is the shortest prefix whose mass reaches top_p (distillspec.sd.sampling.nucleus_mask's
    rule); where the top k hold less than top_p it is cut at k and normalised by top_p. top_p = 1: p = exp(log-p)
    on the k ids (complete only where they hold all the mass)."""
    lp = topk_logp.float()
    if temperature == 0.0:
        p = torch.zeros_like(lp)
        p[..., 0] = 1.0
        return p, torch.ones(lp.shape[:-1], dtype=torch.bool, device=lp.device)
    probs = lp.exp()
    mass = probs.sum(-1)
    if top_p >= 1.0:
        return probs, mass >= 1.0 - 1e-6
    keep = (probs.cumsum(-1) - probs) < top_p
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    complete = mass >= top_p
    norm = torch.where(complete, kept.sum(-1), torch.full_like(mass, top_p))
    return kept / norm.unsqueeze(-1), complete


def draft_processed_at(draft_logits: Tensor, topk_idx: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """(N, V) draft logits, (N, k) token ids -> ((N, k) the draft's processed probabilities q at those ids, (N,)
    q's mass outside them), q = process_logits(draft_logits, temperature, top_p) in float32."""
    q = process_logits(draft_logits, temperature, top_p)
    at = q.gather(-1, topk_idx.long())
    return at, (1.0 - at.sum(-1)).clamp_min(0.0)


def position_acceptance(p: Tensor, q_at: Tensor) -> Tensor:
    """(N, k) target and draft processed probabilities on the same ids -> (N,) sum of min(p, q)."""
    return torch.minimum(p, q_at.to(p.dtype)).sum(-1)


def prompt_sums(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) per-position values, (B, T) bool mask -> ((B,) sums over each row's masked positions, (B,) counts),
    float64."""
    m = mask.to(torch.float64)
    return (values.to(torch.float64) * m).sum(-1), m.sum(-1)
