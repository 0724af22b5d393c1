"""SpecKD loss gating: weight each token's distillation loss by whether the teacher would accept the
student's proposal there, as in speculative decoding's verify step.

At every position the student proposes a token; the teacher "accepts" it when it is among the teacher's
top-k tokens. Accepted positions get weight 1, rejected ones weight `beta` (0 drops them entirely).
Modes:

    greedy   the proposal is the student's argmax.
    sampled  `num_candidates` proposals drawn i.i.d. (with replacement) from softmax(student_logits) with
             the given torch.Generator; accepted if ANY candidate is in the teacher's top-k. More
             candidates can only add chances, so acceptance rises with num_candidates.
    ratio    probability-ratio variant (speculative sampling's acceptance probability): for the
             student's greedy token x, weight = max(beta, min(1, p_teacher(x) / q_student(x))), and
             accepted = (p_teacher(x) >= q_student(x)), i.e. the proposal would be accepted with
             probability 1. top_k is validated but not used in this mode.

"In the top-k" is tie-inclusive: the teacher logit of the proposal is >= the teacher's k-th largest
logit (k is clamped to V). All work runs under no_grad, in float32, ROW_CHUNK positions at a time so
the float32 temporaries stay O(ROW_CHUNK * V) for large vocabularies; outputs are detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distillspec.errors import ConfigError, check_choice, check_range

GATE_MODES = ("greedy", "sampled", "ratio")
ROW_CHUNK = 1024

__all__ = ["GATE_MODES", "GateResult", "speckd_gate"]


@dataclass
class GateResult:
    """Output of speckd_gate.

    weights: (B, T) float32; 1 where accepted, beta where not (ratio mode: max(beta, min(1, p/q))).
    accepted: (B, T) bool; the student's proposal is in the teacher's top-k (ratio mode: p >= q).
    """

    weights: Tensor
    accepted: Tensor


def _in_top_k(teacher: Tensor, tokens: Tensor, k: int) -> Tensor:
    """teacher: (N, V) logits, tokens: (N, C) long -> (N,) bool, any token in the teacher's top-k."""
    kth = torch.topk(teacher, k, dim=-1).values[:, -1:]  # (N, 1)
    return (teacher.gather(-1, tokens) >= kth).any(-1)


def _sample(student: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """student: (N, V) float32 logits -> (N, n) long tokens sampled from softmax, with replacement."""
    probs = torch.softmax(student, dim=-1)
    bad = ~torch.isfinite(probs).all(-1)  # rows with all -inf / NaN logits: sample uniformly
    if bad.any():
        probs[bad] = 1.0
    return torch.multinomial(probs, n, replacement=True, generator=generator)


@torch.no_grad()
def speckd_gate(student_logits: Tensor, teacher_logits: Tensor, *, top_k: int = 5, mode: str = "greedy",
                num_candidates: int = 1, beta: float = 0.01,
                generator: torch.Generator | None = None) -> GateResult:
    """SpecKD gate weights for every position.

    Args:
        student_logits, teacher_logits: (B, T, V) any float dtype (same shape); no grad needed.
        top_k: teacher top-k size, >= 1. mode: "greedy" | "sampled" | "ratio" (module docstring).
        num_candidates: proposals per position in "sampled" mode, >= 1.
        beta: weight of rejected positions (floor of the ratio weights), in [0, 1].
        generator: torch.Generator for "sampled" mode (the global RNG when None).

    Returns:
        GateResult(weights (B, T) float32, accepted (B, T) bool), both detached.
    """
    check_choice("gate mode", mode, GATE_MODES)
    if top_k < 1:
        raise ConfigError(f"top_k={top_k!r} is invalid; valid: >= 1")
    if num_candidates < 1:
        raise ConfigError(f"num_candidates={num_candidates!r} is invalid; valid: >= 1")
    check_range("gate beta", beta, lo=0.0, hi=1.0)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
                         f"{tuple(teacher_logits.shape)}")

    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    k = min(int(top_k), vocab)
    student = student_logits.detach().reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    n = student.shape[0]
    accepted = torch.zeros(n, dtype=torch.bool, device=student.device)
    weights = torch.empty(n, dtype=torch.float32, device=student.device)
    for i in range(0, n, ROW_CHUNK):
        s = student[i:i + ROW_CHUNK].float()
        t = teacher[i:i + ROW_CHUNK].float()
        if mode == "ratio":
            x = s.argmax(-1, keepdim=True)
            log_ratio = (torch.log_softmax(t, -1).gather(-1, x) - torch.log_softmax(s, -1).gather(-1, x)).squeeze(-1)
            acc = log_ratio >= 0
            w = log_ratio.clamp(max=0.0).exp().clamp(min=beta)
            w = torch.nan_to_num(w, nan=beta)
        else:
            tokens = s.argmax(-1, keepdim=True) if mode == "greedy" else _sample(s, num_candidates, generator)
            acc = _in_top_k(t, tokens, k)
            w = torch.where(acc, 1.0, float(beta)).float()
        accepted[i:i + ROW_CHUNK] = acc
        weights[i:i + ROW_CHUNK] = w
    return GateResult(weights=weights.view(lead), accepted=accepted.view(lead))
