"""Divergences against a *sparse* teacher: its top-k log-probabilities plus the mass of everything else.

A cached teacher (distillspec.rollout.teacher_cache) stores, per completion position, the k most likely
tokens and their log-probabilities at the objective's temperature. The remaining vocabulary is one
"tail" bucket of mass 1 - sum(top-k). The student is coarse-grained the same way: its log-probabilities
on the teacher's k tokens, and the log of its remaining mass. Any divergence of distillspec.losses.divergences
is then applied to these two (k + 1)-bucket distributions:

    D_k(P, Q) = D(P_k, Q_k),  P_k = (p_1..p_k, 1 - sum p_i),  Q_k = (q_1..q_k, 1 - sum q_i)

By the data-processing inequality D_k <= D for every f-divergence (KL both ways, JSD, TV, skew KL), with
equality when k = V (the tail is empty: both tails are exactly 0). The gradient reaches every student
logit: through the k gathered log-probs and through the tail's log-sum-exp.

Memory: rows are processed `chunk_size` at a time under activation checkpointing, so float32 temporaries
are O(chunk_size * V); given the student's logits, their (N, V) gradient is the only full-size allocation.
Given instead the student's final hidden states and its output head (`to_logits`,
distillspec.models.forward.completion_hidden), the logits themselves exist for one chunk at a time, in forward
and (recomputed) in backward: nothing of size (N, V) is ever allocated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distillspec.losses.divergences import per_row_divergence
from distillspec.losses.logprobs import LOG_ZERO
from distillspec.losses.logprobs import compute_dtype as _compute_dtype

__all__ = ["bucket_rows", "bucket_stats", "student_buckets", "teacher_buckets", "sparse_row_divergence",
           "sparse_divergence_loss"]


def teacher_buckets(topk_logp: Tensor, tail_logp: Tensor | None = None) -> Tensor:
    """(N, k) teacher top-k log-probs (+ (N,) log of the rest's mass) -> (N, k + 1) bucket log-probs.

    Pass tail_logp when it is known (a cache computes it as a log-sum-exp, -inf when k = V); without it
    the tail is log(1 - sum top-k), whose rounding error matters when the tail is tiny.
    """
    lp = topk_logp.float() if topk_logp.dtype != torch.float64 else topk_logp
    if tail_logp is None:
        tail_logp = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))  # -inf when the top-k hold all the mass
    return torch.cat([lp, tail_logp.to(lp.dtype).unsqueeze(-1)], -1).clamp(min=LOG_ZERO)


def student_buckets(student_logits: Tensor, topk_idx: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, V) student logits, (N, k) teacher top-k ids -> (N, k + 1) student bucket log-probs.

    The tail is log-sum-exp of the student's log-probs outside the k ids (computed directly, not as
    log(1 - sum), so it stays accurate when the top-k hold almost all the mass).
    """
    x = student_logits.to(_compute_dtype(student_logits))
    if temperature != 1.0:
        x = x / temperature
    lq = torch.log_softmax(x, -1)
    head = lq.gather(-1, topk_idx)
    tail = lq.scatter(-1, topk_idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([head, tail], -1).clamp(min=LOG_ZERO)


def sparse_row_divergence(student_logits: Tensor, topk_idx: Tensor, topk_logp: Tensor, name: str,
                          temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                          tail_logp: Tensor | None = None) -> Tensor:
    """(N, V) student logits, (N, k) teacher ids and log-probs (already at `temperature`), optional (N,)
    teacher tail log-mass -> (N,) D_k."""
    sb = student_buckets(student_logits, topk_idx, temperature)
    tb = teacher_buckets(topk_logp, tail_logp).to(sb.dtype)
    # Bucket log-probs are normalised, so per_row_divergence's log_softmax leaves them unchanged.
    return per_row_divergence(sb, tb, name, 1.0, beta, alpha)


def bucket_rows(x: Tensor, topk_idx: Tensor, temperature: float = 1.0, chunk_size: int | None = 1024,
                to_logits: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(N, D) student rows, (N, k) teacher top-k ids -> (N, k + 1) student bucket log-probs, chunk_size rows at a
    time. The rows are logits (D = V), or with `to_logits` (a map (C, D) -> (C, V), e.g. an output head) hidden
    states. Under autograd each chunk is checkpointed (logits: when there is more than one chunk; hidden states:
    always), so its (C, V) temporaries are freed after forward and recomputed, one chunk at a time, in backward."""

    def fn(x_c: Tensor, i_c: Tensor) -> Tensor:
        return student_buckets(x_c if to_logits is None else to_logits(x_c), i_c, temperature)

    n = x.shape[0]
    chunk = chunk_size or max(n, 1)
    if to_logits is None:
        use_ckpt = chunk_size is not None and x.requires_grad and n > chunk
    else:
        use_ckpt = chunk_size is not None and torch.is_grad_enabled()
    parts = [checkpoint(fn, x[i:i + chunk], topk_idx[i:i + chunk], use_reentrant=False) if use_ckpt
             else fn(x[i:i + chunk], topk_idx[i:i + chunk]) for i in range(0, n, chunk)]
    return torch.cat(parts) if parts else x.new_zeros(0, topk_idx.shape[-1] + 1, dtype=_compute_dtype(x))


def bucket_stats(student_b: Tensor, teacher_b: Tensor) -> tuple[Tensor, Tensor]:
    """(N, k + 1) student and teacher bucket log-probs -> sums over rows of the teacher's bucket entropy and of
    1 - TV between the buckets (a lower bound of the entropy and an upper bound of 1 - TV; exact when k = V)."""
    tp = teacher_b.exp()
    return -(tp * teacher_b).sum(), torch.minimum(student_b.exp(), tp).sum()


def sparse_divergence_loss(student_logits: Tensor, topk_idx: Tensor, topk_logp: Tensor, mask: Tensor,
                           name: str, *, weights: Tensor | None = None, temperature: float = 1.0,
                           beta: float = 0.5, alpha: float = 0.1, chunk_size: int | None = 1024,
                           normalizer: float | Tensor | None = None, tail_logp: Tensor | None = None,
                           to_logits: Callable[[Tensor], Tensor] | None = None,
                           aux: dict | None = None) -> tuple[Tensor, Tensor]:
    """Masked mean of D_k over positions, like divergences.divergence_loss but against a sparse teacher.

    student_logits (B, T, V), or with `to_logits` (a map (C, H) -> (C, V): the student's output head) the
    student's (B, T, H) final hidden states (see bucket_rows); topk_idx (B, T, k) long; topk_logp (B, T, k)
    teacher log-probs at `temperature`; mask (B, T) bool; weights (B, T) optional per-position weights
    (detached); tail_logp (B, T) optional teacher log-mass outside the top-k (see teacher_buckets).
    aux: when given, receives "student_buckets" and "teacher_buckets", (N, k + 1) for the N masked positions
    (detached; bucket_stats sums their statistics).
    Returns (loss scalar = sum(w * D_k over masked) / normalizer, per_token (B, T) with zeros off-mask).
    """
    if name == "adaptive":
        raise ValueError("the adaptive divergence needs the dense teacher (its per-token entropy); "
                         "the teacher cache is not used with it")
    if student_logits.shape[:-1] != topk_idx.shape[:-1] or topk_idx.shape != topk_logp.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, topk_idx "
                         f"{tuple(topk_idx.shape)}, topk_logp {tuple(topk_logp.shape)}")
    flat = mask.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    s = student_logits.reshape(-1, student_logits.shape[-1])[rows]
    idx = topk_idx.reshape(-1, topk_idx.shape[-1])[rows].to(s.device)
    lp = topk_logp.reshape(-1, topk_logp.shape[-1])[rows].to(s.device)
    if tail_logp is None:
        tail_logp = torch.log1p(-topk_logp.double().exp().sum(-1).clamp(max=1.0))
    tail = tail_logp.reshape(-1)[rows].to(s.device)
    sb = bucket_rows(s, idx, temperature, chunk_size, to_logits)
    tb = teacher_buckets(lp, tail).to(sb.dtype)
    # Bucket log-probs are normalised, so per_row_divergence's log_softmax leaves them unchanged.
    per_rows = per_row_divergence(sb, tb, name, 1.0, beta, alpha)
    if aux is not None:
        aux["student_buckets"], aux["teacher_buckets"] = sb.detach(), tb
    weighted = per_rows if weights is None else per_rows * weights.detach().reshape(-1)[rows].to(per_rows.dtype)
    if normalizer is None:
        normalizer = mask.sum().clamp_min(1).to(per_rows.dtype)
    loss = weighted.sum() / normalizer
    per_token = per_rows.new_zeros(flat.numel()).index_copy(0, rows, per_rows.detach()).view(mask.shape)
    return loss, per_token
