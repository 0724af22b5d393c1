"""Token-level divergences between a teacher P and a student Q, with a memory-bounded chunked path.

P = softmax(teacher_logits / temperature), Q = softmax(student_logits / temperature), both computed in
log-space (log_softmax) in float32 (float64 when an input is float64, so gradcheck works). Per token:

    fkl   KL(P || Q)                       = sum_v P (log P - log Q)
    rkl   KL(Q || P)
    jsd   beta KL(P || M) + (1-beta) KL(Q || M),  M = beta P + (1-beta) Q   (beta in (0, 1))
    tvd   0.5 sum_v |P - Q|
    skl   KL(P || alpha P + (1-alpha) Q)         (alpha in [0, 1); alpha = 0 is fkl)
    srkl  KL(Q || alpha Q + (1-alpha) P)         (alpha = 0 is rkl)
    adaptive  per-token beta_t = schedule(H_t) from the teacher's entropy (distillspec.losses.adaptive), in one
          of three forms (`form`):
          njsd  normalised JSD: jsd(beta_t) / (beta_t (1 - beta_t)) = KL(P || M)/(1-beta) + KL(Q || M)/beta;
                its limits are exact endpoints: beta_t = 0 gives fkl, beta_t = 1 gives rkl (default)
          jsd   jsd(beta_t) itself (0 at beta_t in {0, 1}); a constant schedule reproduces jsd(beta)
          mix   (1 - beta_t) fkl + beta_t rkl

No temperature**2 factor is applied: temperature=2 is exactly the same as passing logits / 2.

Numerics. Logits may contain -inf (masked vocabulary entries). Log-probabilities are clamped below at the
finite constant LOG_ZERO (= -1000; distillspec.losses.logprobs) before any arithmetic, so exp() of -inf entries
is exactly 0 and terms with P = 0 contribute exactly 0 to both value and gradient (the xlogy convention), with no NaN anywhere.
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

from distillspec import constants as C
from distillspec.errors import ConfigError, check_choice
from distillspec.losses import adaptive as A
from distillspec.losses.adaptive import ADAPTIVE_FORMS
from distillspec.losses.logprobs import LOG_ZERO
from distillspec.losses.logprobs import compute_dtype as _compute_dtype
from distillspec.losses.logprobs import log_probs as _log_probs

DIVERGENCES = C.DIVERGENCES

BETA_EPS = 1e-6
"""njsd evaluates its JSD formula at beta clamped to [BETA_EPS, 1 - BETA_EPS]; beta exactly 0 / 1 use fkl / rkl."""

__all__ = ["ADAPTIVE_FORMS", "DIVERGENCES", "LOG_ZERO", "divergence_loss", "entropy", "overlap", "per_row_divergence"]


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """(N, V) x2 finite log-probs -> (N,) KL(a || b); entries with a = exp(log_a) = 0 contribute 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) for finite log-probs; w in [0, 1)."""
    if w == 0.0:
        return log_b
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def per_token_jsd(lp: Tensor, lq: Tensor, beta: Tensor, form: str = "njsd") -> Tensor:
    """Generalised JSD family with a per-row beta. lp, lq: (N, V) finite log-probs; beta: (N,) in [0, 1].

    Returns (N,): form "jsd" = beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q; "njsd" = that divided
    by beta (1-beta), i.e. KL(P||M)/(1-beta) + KL(Q||M)/beta, which is exactly fkl at beta = 0 and rkl at
    beta = 1 (its limits); "mix" = (1-beta) fkl + beta rkl. beta is a constant (no gradient flows into it).

    Numerics of njsd near the endpoints: KL(Q||M) is O(beta^2) as beta -> 0, so computing log M and then
    subtracting log Q (errors ~eps |log Q|) and dividing by beta would blow float32 rounding up by 1/beta.
    Instead log(M/Q) = logaddexp(log(1-beta), log(beta) + log P - log Q) and log(M/P) symmetrically are formed
    directly from the log-ratio, so their error is relative to their own (small) size; since sum P = sum Q
    = sum M, njsd = -sum_v [P log(M/P) / (1-beta) + Q log(M/Q) / beta]. Inside that formula beta is clamped
    to [BETA_EPS, 1 - BETA_EPS]; rows with beta exactly 0 or 1 take fkl / rkl (torch.where, finite both ways).
    """
    beta = beta.detach().to(lp.dtype)
    if form == "mix":
        return (1.0 - beta) * _kl(lp, lq) + beta * _kl(lq, lp)
    b = beta.clamp(BETA_EPS, 1.0 - BETA_EPS)
    lb, lb1 = b.log().unsqueeze(-1), torch.log1p(-b).unsqueeze(-1)
    d = lp - lq
    log_m_q = torch.logaddexp(lb1, lb + d)   # log(M / Q)
    log_m_p = torch.logaddexp(lb, lb1 - d)   # log(M / P)
    kl_pm = -(lp.exp() * log_m_p).sum(-1)    # KL(P || M)
    kl_qm = -(lq.exp() * log_m_q).sum(-1)    # KL(Q || M)
    if form == "jsd":
        return torch.where((beta > 0) & (beta < 1), b * kl_pm + (1.0 - b) * kl_qm, torch.zeros_like(kl_pm))
    out = kl_pm / (1.0 - b) + kl_qm / b
    if bool((beta == 0).any()):
        out = torch.where(beta == 0, _kl(lp, lq), out)
    if bool((beta == 1).any()):
        out = torch.where(beta == 1, _kl(lq, lp), out)
    return out


def per_row_divergence(student: Tensor, teacher: Tensor, name: str, temperature: float = 1.0,
                       beta: float | Tensor = 0.5, alpha: float = 0.1, form: str = "njsd") -> Tensor:
    """student, teacher: (N, V) logits already in the compute dtype -> (N,) divergence per row.

    beta: a float, or for "adaptive" an (N,) tensor of per-row betas (a float is broadcast). form: the
    adaptive form (ADAPTIVE_FORMS). Differentiable w.r.t. `student` (and `teacher`, which callers pass
    detached). No validation here.
    """
    lq = _log_probs(student, temperature)
    lp = _log_probs(teacher, temperature)
    if name == "adaptive":
        if not isinstance(beta, Tensor):
            beta = torch.full(lq.shape[:-1], float(beta), dtype=lq.dtype, device=lq.device)
        return per_token_jsd(lp, lq, beta, form)
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

    forward(student (R, V), teacher (R, V), rows (N,) long, betas (N,) or None, cfg) -> (N,) in the compute
    dtype, where cfg = (name, temperature, beta, alpha, chunk_size, compute_dtype, form); betas (per selected
    row, for "adaptive") replace the scalar beta. Gradient only w.r.t. student.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor, betas: Tensor | None, cfg: tuple) -> Tensor:
        name, temperature, beta, alpha, chunk, cd, form = cfg
        out = torch.empty(rows.numel(), dtype=cd, device=student.device)
        for i in range(0, rows.numel(), chunk):
            idx = rows[i:i + chunk]
            b = beta if betas is None else betas[i:i + chunk]
            out[i:i + chunk] = per_row_divergence(student[idx].to(cd), teacher[idx].to(cd),
                                                  name, temperature, b, alpha, form)
        ctx.save_for_backward(student, teacher, rows, betas)  # references to the inputs, no copies
        ctx.cfg = cfg
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        student, teacher, rows, betas = ctx.saved_tensors
        name, temperature, beta, alpha, chunk, cd, form = ctx.cfg
        grad = torch.zeros_like(student)
        with torch.enable_grad():
            for i in range(0, rows.numel(), chunk):
                idx = rows[i:i + chunk]
                b = beta if betas is None else betas[i:i + chunk]
                x = student[idx].detach().to(cd).requires_grad_(True)
                val = per_row_divergence(x, teacher[idx].to(cd), name, temperature, b, alpha, form)
                (g,) = torch.autograd.grad(val, x, grad_out[i:i + chunk].to(cd))
                grad.index_copy_(0, idx, g.to(grad.dtype))
                del x, val, g
        return grad, None, None, None, None


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
                    normalizer: float | Tensor | None = None, schedule=None, block_weighting: str = "none",
                    block_gamma: int = 5, aux: dict | None = None) -> tuple[Tensor, Tensor]:
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
        schedule: for "adaptive", a losses.adaptive.BetaSchedule (None = its defaults): beta_t from the
            teacher's entropy at `temperature`, and the form (njsd / jsd / mix).
        block_weighting: "none", "block" or "block_avg": multiply the weights by the detached probability of
            reaching each position in a `block_gamma`-token SD block (losses.adaptive.reach_weights).
        aux: optional dict, filled with detached (B, T) tensors (0 where mask is False): "entropy" (teacher
            entropy at `temperature`, nats), "beta" (adaptive only), "block_weight" (block weighting only).

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
    if name == "adaptive" and schedule is None:
        schedule = A.BetaSchedule()

    vocab = student_logits.shape[-1]
    cd = _compute_dtype(student_logits, teacher_logits)
    mask = mask.to(device=student_logits.device, dtype=torch.bool)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    ent = betas = None
    if name == "adaptive" or aux is not None:
        ent = A.row_entropy(teacher, rows, float(temperature), chunk_size or A.ROW_CHUNK, cd)
    if name == "adaptive":
        betas = schedule(ent).to(cd)
    form = schedule.form if name == "adaptive" else "njsd"
    if chunk_size is None:
        s_rows, t_rows = (student[rows], teacher[rows]) if rows.numel() < student.shape[0] else (student, teacher)
        per_rows = per_row_divergence(s_rows.to(cd), t_rows.to(cd), name, float(temperature),
                                      float(beta) if betas is None else betas, float(alpha), form)
    else:
        cfg = (name, float(temperature), float(beta), float(alpha), int(chunk_size), cd, form)
        per_rows = _ChunkedDivergence.apply(student, teacher, rows, betas, cfg)

    w_rows = None if weights is None else weights.detach().reshape(-1)[rows].to(cd)
    if block_weighting != "none":
        reach = A.reach_weights(student_logits.detach(), teacher_logits.detach(), mask, block_gamma,
                                block_weighting, float(temperature), chunk_size or A.ROW_CHUNK)
        r_rows = reach.reshape(-1)[rows].to(cd)
        w_rows = r_rows if w_rows is None else w_rows * r_rows
    weighted = per_rows if w_rows is None else per_rows * w_rows
    if aux is not None:
        scatter = lambda x: x.new_zeros(mask.numel()).index_copy(0, rows, x.detach()).view(mask.shape)  # noqa: E731
        aux["entropy"] = scatter(ent)
        if betas is not None:
            aux["beta"] = scatter(betas)
        if block_weighting != "none":
            aux["block_weight"] = scatter(r_rows)
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
