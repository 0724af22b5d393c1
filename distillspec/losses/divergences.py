"""Token-level divergences between a teacher P and a student Q, with a memory-bounded chunked path.

P = softmax(teacher_logits / temperature), Q = softmax(student_logits / temperature), both computed in
log-space (log_softmax) in float32 (float64 when an input is float64, so gradcheck works). Per token:

    fkl   KL(P || Q)                       = sum_v P (log P - log Q)
    rkl   KL(Q || P)
    jsd   beta KL(P || M) + (1-beta) KL(Q || M),  M = beta P + (1-beta) Q   (beta in (0, 1))
    tvd   0.5 sum_v |P - Q|
    skl   KL(P || alpha P + (1-alpha) Q)         (alpha in [0, 1); alpha = 0 is fkl)
    srkl  KL(Q || alpha Q + (1-alpha) P)         (alpha = 0 is rkl)

No temperature**2 factor is applied: temperature=2 is exactly the same as passing logits / 2.

Numerics. Logits may contain -inf (masked vocabulary entries). Log-probabilities are clamped below at the
finite constant LOG_ZERO (= -1000) before any arithmetic, so exp() of -inf entries is exactly 0 and terms with
P = 0 contribute exactly 0 to both value and gradient (the xlogy convention), with no NaN anywhere.
When both models mask the same tokens nothing changes. When only one side gives a token probability 0
while the other gives it mass (e.g. rkl with a teacher that masks a token the student still uses), the
true divergence is +inf; here the zero probability is treated as exp(LOG_ZERO), so the value stays
finite (a penalty of about 1000 nats per unit of mass) and the gradient stays finite and points away
from the token. LOG_ZERO is far below any realistic finite log-probability; the clamp only touches entries
whose probability is exactly 0 in floating point (exp(-1000) underflows even in float64), and like -inf
entries they pass no gradient through their own log-probability.

Memory. With chunk_size=None the divergence is plain autograd over the masked rows (it saves several
float32 (N, V) intermediates for backward). With chunk_size=C, only masked rows are processed, C rows at
a time, by a custom autograd.Function: forward keeps only the (N,) per-row values; backward recomputes
each chunk's graph and writes its gradient into one zero-filled tensor of the student's shape and dtype.
So the only (B, T, V)-sized allocation is the gradient itself; float32 temporaries are O(C * V).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distillspec.errors import ConfigError, check_choice, check_range

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")

LOG_ZERO = -1000.0
"""Finite stand-in for log(0) (see the module docstring)."""

__all__ = ["DIVERGENCES", "LOG_ZERO", "divergence_loss", "entropy", "overlap", "per_row_divergence"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(..., V) -> (..., V) log_softmax(logits / temperature), clamped below at LOG_ZERO (so -inf -> LOG_ZERO)."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).clamp(min=LOG_ZERO)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """(N, V) x2 finite log-probs -> (N,) KL(a || b); entries with a = exp(log_a) = 0 contribute 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) for finite log-probs; w in [0, 1)."""
    if w == 0.0:
        return log_b
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def per_row_divergence(student: Tensor, teacher: Tensor, name: str, temperature: float = 1.0,
                       beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """student, teacher: (N, V) logits already in the compute dtype -> (N,) divergence per row.

    Differentiable w.r.t. `student` (and `teacher`, which callers pass detached). No validation here.
    """
    lq = _log_probs(student, temperature)
    lp = _log_probs(teacher, temperature)
    if name == "fkl":
        return _kl(lp, lq)
    if name == "rkl":
        return _kl(lq, lp)
    if name == "jsd":
        lm = _log_mix(lp, lq, beta)
        return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if name == "skl":
        return _kl(lp, _log_mix(lp, lq, alpha))
    if name == "srkl":
        return _kl(lq, _log_mix(lq, lp, alpha))
    raise ConfigError(f"unknown divergence {name!r}; valid choices: {', '.join(DIVERGENCES)}")


class _ChunkedDivergence(torch.autograd.Function):
    """Per-row divergence of the selected rows, C rows at a time, recomputed chunk-wise in backward.

    Rows are gathered with advanced indexing (on CPU, index_select over long rows is ~30x slower).

    forward(student (R, V), teacher (R, V), rows (N,) long, cfg) -> (N,) in the compute dtype, where
    cfg = (name, temperature, beta, alpha, chunk_size, compute_dtype). Gradient only w.r.t. student.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor, cfg: tuple) -> Tensor:
        name, temperature, beta, alpha, chunk, cd = cfg
        out = torch.empty(rows.numel(), dtype=cd, device=student.device)
        for i in range(0, rows.numel(), chunk):
            idx = rows[i:i + chunk]
            out[i:i + chunk] = per_row_divergence(student[idx].to(cd), teacher[idx].to(cd),
                                                  name, temperature, beta, alpha)
        ctx.save_for_backward(student, teacher, rows)  # references to the inputs, no copies
        ctx.cfg = cfg
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        student, teacher, rows = ctx.saved_tensors
        name, temperature, beta, alpha, chunk, cd = ctx.cfg
        grad = torch.zeros_like(student)
        with torch.enable_grad():
            for i in range(0, rows.numel(), chunk):
                idx = rows[i:i + chunk]
                x = student[idx].detach().to(cd).requires_grad_(True)
                val = per_row_divergence(x, teacher[idx].to(cd), name, temperature, beta, alpha)
                (g,) = torch.autograd.grad(val, x, grad_out[i:i + chunk].to(cd))
                grad.index_copy_(0, idx, g.to(grad.dtype))
                del x, val, g
        return grad, None, None, None


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
                         f"{tuple(teacher_logits.shape)}")
    if student_logits.dim() < 1 or not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError(f"logits must be floating tensors of shape (..., V); got dtypes "
                         f"{student_logits.dtype}, {teacher_logits.dtype}")


def divergence_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, name: str, *,
                    weights: Tensor | None = None, temperature: float = 1.0, beta: float = 0.5,
                    alpha: float = 0.1, chunk_size: int | None = None,
                    normalizer: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masked, optionally weighted token-level divergence between teacher and student.

    Args:
        student_logits: (B, T, V) any float dtype, may contain -inf. Receives the gradient.
        teacher_logits: (B, T, V) same shape; treated as a constant (detached).
        mask: (B, T) bool; only True positions are computed (others are never read).
        name: one of DIVERGENCES.
        weights: optional (B, T) float per-token weights (detached), e.g. SpecKD gate weights.
        temperature: > 0; both distributions are softmax(logits / temperature).
        beta: jsd mixture weight, in (0, 1). alpha: skl / srkl skew, in [0, 1).
        chunk_size: None for plain autograd; an int C >= 1 for the memory-bounded chunked path.
        normalizer: divisor of the weighted sum; defaults to mask.sum() clamped to >= 1.

    Returns:
        (loss, per_token): loss is a scalar = sum over mask of weights * per_token, / normalizer;
        per_token is (B, T) unweighted divergence, 0 where mask is False. Both are float32 (float64 when
        an input is float64).
    """
    check_choice("divergence", name, DIVERGENCES)
    _check_logits(student_logits, teacher_logits)
    lead = tuple(student_logits.shape[:-1])
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits leading shape {lead}")
    if weights is not None and tuple(weights.shape) != lead:
        raise ValueError(f"weights shape {tuple(weights.shape)} != logits leading shape {lead}")
    check_range("temperature", temperature, lo=0.0, lo_open=True)
    if name == "jsd":
        check_range("beta", beta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if name in ("skl", "srkl"):
        check_range("alpha", alpha, lo=0.0, hi=1.0, hi_open=True)
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} is invalid; valid: >= 1 or None")

    vocab = student_logits.shape[-1]
    cd = _compute_dtype(student_logits, teacher_logits)
    mask = mask.to(device=student_logits.device, dtype=torch.bool)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if chunk_size is None:
        if rows.numel() < student.shape[0]:  # gather the masked rows (a full mask needs no copy)
            student, teacher = student[rows], teacher[rows]
        per_rows = per_row_divergence(student.to(cd), teacher.to(cd), name, float(temperature), float(beta),
                                      float(alpha))
    else:
        cfg = (name, float(temperature), float(beta), float(alpha), int(chunk_size), cd)
        per_rows = _ChunkedDivergence.apply(student, teacher, rows, cfg)

    weighted = per_rows
    if weights is not None:
        weighted = per_rows * weights.detach().reshape(-1)[rows].to(cd)
    if normalizer is None:
        normalizer = mask.sum().clamp_min(1).to(cd)
    loss = weighted.sum() / normalizer
    per_token = per_rows.new_zeros(mask.numel()).index_copy(0, rows, per_rows).view(mask.shape)
    return loss, per_token


def entropy(logits: Tensor) -> Tensor:
    """(..., V) logits -> (...) Shannon entropy in nats of softmax(logits); finite with -inf logits.

    Computed in float32 (float64 for float64 input).
    """
    lp = _log_probs(logits.to(_compute_dtype(logits)))
    return -(lp.exp() * lp).sum(-1)


def overlap(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """(..., V) x2 logits -> (...) sum_v min(p, q) = 1 - TV(p, q) of their softmaxes.

    Computed in float32 (float64 when an input is float64).
    """
    _check_logits(p_logits, q_logits)
    cd = _compute_dtype(p_logits, q_logits)
    p = torch.softmax(p_logits.to(cd), dim=-1)
    q = torch.softmax(q_logits.to(cd), dim=-1)
    return torch.minimum(p, q).sum(-1)
