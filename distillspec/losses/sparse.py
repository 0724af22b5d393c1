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
are O(chunk_size * V); the (N, V) gradient of the student logits is the only full-size allocation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distillspec.losses.divergences import per_row_divergence
from distillspec.losses.logprobs import LOG_ZERO
from distillspec.losses.logprobs import compute_dtype as _compute_dtype

__all__ = ["student_buckets", "teacher_buckets", "sparse_row_divergence", "sparse_divergence_loss"]


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


def sparse_divergence_loss(student_logits: Tensor, topk_idx: Tensor, topk_logp: Tensor, mask: Tensor,
                           name: str, *, weights: Tensor | None = None, temperature: float = 1.0,
                           beta: float = 0.5, alpha: float = 0.1, chunk_size: int | None = 1024,
                           normalizer: float | Tensor | None = None,
                           tail_logp: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masked mean of D_k over positions, like divergences.divergence_loss but against a sparse teacher.

    student_logits (B, T, V); topk_idx (B, T, k) long; topk_logp (B, T, k) teacher log-probs at
    `temperature`; mask (B, T) bool; weights (B, T) optional per-position weights (detached);
    tail_logp (B, T) optional teacher log-mass outside the top-k (see teacher_buckets).
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

    def fn(s_c: Tensor, i_c: Tensor, l_c: Tensor, t_c: Tensor) -> Tensor:
        return sparse_row_divergence(s_c, i_c, l_c, name, temperature, beta, alpha, t_c)

    chunk = chunk_size or max(rows.numel(), 1)
    parts = []
    for i in range(0, rows.numel(), chunk):
        args = (s[i:i + chunk], idx[i:i + chunk], lp[i:i + chunk], tail[i:i + chunk])
        use_ckpt = chunk_size is not None and s.requires_grad and rows.numel() > chunk
        parts.append(checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args))
    per_rows = torch.cat(parts) if parts else s.new_zeros(0, dtype=_compute_dtype(s))
    weighted = per_rows if weights is None else per_rows * weights.detach().reshape(-1)[rows].to(per_rows.dtype)
    if normalizer is None:
        normalizer = mask.sum().clamp_min(1).to(per_rows.dtype)
    loss = weighted.sum() / normalizer
    per_token = per_rows.new_zeros(flat.numel()).index_copy(0, rows, per_rows.detach()).view(mask.shape)
    return loss, per_token
