"""Entropy-adaptive distillation and acceptance-aware token weights (pure torch).

Adaptive beta. The generalised JSD(beta) of this project (distillspec.losses.divergences) moves from forward KL
(beta -> 0) to reverse KL (beta -> 1). The reference study found mode-seeking RKL best where the teacher is
confident and JSD holding up where it is uncertain; `BetaSchedule` sets beta per token from the teacher's
entropy H_t (nats, of softmax(teacher_logits / temperature), computed under no_grad, so never differentiated):

    logistic  beta(H) = beta_confident + (beta_uncertain - beta_confident) * sigmoid((ln H - ln center) / width)
              i.e. beta_confident at H << center, beta_uncertain at H >> center, the midpoint at H = center.
    table     edges e_0 < ... < e_{k-1} (nats) and k + 1 values: beta = values[i] for H in [e_{i-1}, e_i)
              (values[0] below e_0, values[k] from e_{k-1} up).

`reverse=True` gives the opposite schedule for ablation (logistic: the two ends swapped; table: values reversed).
A logistic schedule with equal ends, or a table with no edges and one value, is constant. The per-token loss is
then one of the forms of divergences.per_token_jsd (default "njsd", whose endpoints are exactly fkl and rkl).

Block-aware weights (`reach_weights`). In SD a drafted token at offset j of a gamma-block is only looked at when
the j earlier tokens of the block were all accepted. With a_t = sum_v min(p_t, q_t) = 1 - TV(p_t, q_t), the
probability that the draft's token at t is accepted (tvd's per-token value is exactly 1 - a_t), the weight of
position t is the probability of reaching it, held constant (detached):

    block      blocks aligned to the completion start: t = gamma * n + j  ->  w_t = prod_{k = t-j}^{t-1} a_k
               (w = 1 at each block's first position);
    block_avg  the offset j averaged uniformly over 0..gamma-1 (blocks restart after every rejection in real
               SD, so alignment to the start is arbitrary after the first block): w_t = (1/gamma) sum_j
               prod_{k = max(0, t-j)}^{t-1} a_k.

With div=tvd this weighting minimises sum_t w_t (1 - a_t), i.e. maximises sum_t reach_t * a_t, the expected
accepted tokens per block with the reach probabilities frozen (a surrogate: the exact gradient of the expected
block length also credits position t for the later positions it unlocks). Positions outside the mask get a = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distillspec import constants as C
from distillspec.errors import ConfigError, check_choice, check_range
from distillspec.losses.logprobs import compute_dtype as _compute_dtype
from distillspec.losses.logprobs import log_probs as _log_probs

SCHEDULES = ("logistic", "table")
ADAPTIVE_FORMS = ("njsd", "jsd", "mix")
"""The per-token loss forms of an adaptive schedule (distillspec.losses.divergences.per_token_jsd)."""
BLOCK_WEIGHTINGS = C.BLOCK_WEIGHTINGS
ROW_CHUNK = 1024

__all__ = ["ADAPTIVE_FORMS", "BLOCK_WEIGHTINGS", "BetaSchedule", "SCHEDULES", "entropy_bin_metrics",
           "entropy_bin_sums", "reach_weights", "row_entropy", "train_entropy_edges"]


@dataclass
class BetaSchedule:
    """beta_t = f(teacher entropy H_t); see the module docstring. Validated on construction (ConfigError).

    kind: "logistic" or "table". beta_confident / beta_uncertain: beta at H -> 0 / H -> inf (logistic), in [0, 1].
    center: nats (> 0), the logistic midpoint. width: > 0, the logistic scale in ln-nats. edges / values: the
    table (k ascending edges > 0, k + 1 values in [0, 1]). reverse: the opposite schedule. form: the loss form
    (ADAPTIVE_FORMS). Defaults: RKL (beta = 1) where the teacher is confident, JSD(0.5) where it is
    uncertain, crossing at 1 nat.
    """

    kind: str = "logistic"
    beta_confident: float = 1.0
    beta_uncertain: float = 0.5
    center: float = 1.0
    width: float = 0.5
    edges: tuple[float, ...] | list[float] = ()
    values: tuple[float, ...] | list[float] = ()
    reverse: bool = False
    form: str = "njsd"

    def __post_init__(self) -> None:
        p = "div.adaptive"
        check_choice(f"{p}.kind", self.kind, SCHEDULES)
        check_choice(f"{p}.form", self.form, ADAPTIVE_FORMS)
        self.edges, self.values = tuple(float(e) for e in self.edges), tuple(float(v) for v in self.values)
        if self.kind == "logistic":
            for name in ("beta_confident", "beta_uncertain"):
                check_range(f"{p}.{name}", getattr(self, name), lo=0.0, hi=1.0)
            check_range(f"{p}.center", self.center, lo=0.0, lo_open=True)
            check_range(f"{p}.width", self.width, lo=0.0, lo_open=True)
        else:
            if len(self.values) != len(self.edges) + 1:
                raise ConfigError(f"{p}.values={list(self.values)} needs len(edges) + 1 = {len(self.edges) + 1} "
                                  f"entries for edges={list(self.edges)}")
            if any(e <= 0 or not math.isfinite(e) for e in self.edges) or list(self.edges) != sorted(set(self.edges)):
                raise ConfigError(f"{p}.edges={list(self.edges)} is invalid; valid: strictly ascending finite nats > 0")
            for v in self.values:
                check_range(f"{p}.values entry", v, lo=0.0, hi=1.0)

    def __call__(self, entropy: Tensor) -> Tensor:
        """(...) teacher entropy in nats -> (...) beta in [0, 1], same dtype (float32 if not floating); no grad."""
        h = entropy.detach()
        h = h if h.is_floating_point() else h.float()
        if self.kind == "logistic":
            lo, hi = (self.beta_uncertain, self.beta_confident) if self.reverse else (
                self.beta_confident, self.beta_uncertain)
            z = (h.clamp_min(1e-30).log() - math.log(self.center)) / self.width
            return (lo + (hi - lo) * torch.sigmoid(z)).clamp(0.0, 1.0)
        values = self.values[::-1] if self.reverse else self.values
        table = torch.tensor(values, dtype=h.dtype, device=h.device)
        edges = torch.tensor(self.edges, dtype=h.dtype, device=h.device)
        return table[torch.bucketize(h, edges, right=True)]


@torch.no_grad()
def row_entropy(teacher: Tensor, rows: Tensor, temperature: float = 1.0, chunk: int = ROW_CHUNK,
                dtype: torch.dtype | None = None) -> Tensor:
    """teacher (R, V) logits, rows (N,) long -> (N,) entropy (nats) of softmax(teacher[rows] / temperature).

    Chunked (O(chunk * V) float temporaries), in `dtype` (default float32, float64 for float64 input)."""
    cd = dtype or _compute_dtype(teacher)
    out = torch.empty(rows.numel(), dtype=cd, device=teacher.device)
    for i in range(0, rows.numel(), chunk):
        lp = _log_probs(teacher[rows[i:i + chunk]].to(cd), temperature)
        out[i:i + chunk] = -(lp.exp() * lp).sum(-1)
    return out


@torch.no_grad()
def reach_weights(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, gamma: int, mode: str = "block",
                  temperature: float = 1.0, chunk: int = ROW_CHUNK) -> Tensor:
    """(B, T, V) x2 logits, (B, T) bool mask -> (B, T) detached reach probabilities (module docstring).

    a_t = sum_v min(p_t, q_t) of softmax(logits / temperature) at masked positions, 1 elsewhere. Float32
    (float64 for float64 input). mode: "block" or "block_avg"; gamma >= 1.
    """
    check_choice("div.block_weighting", mode, BLOCK_WEIGHTINGS[1:])
    if not isinstance(gamma, int) or gamma < 1:
        raise ConfigError(f"div.block_gamma={gamma!r} is invalid; valid: an integer >= 1")
    cd = _compute_dtype(student_logits, teacher_logits)
    b, t, v = student_logits.shape
    rows = mask.reshape(-1).nonzero().squeeze(1)
    s, te = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
    acc = torch.ones(b * t, dtype=cd, device=student_logits.device)
    for i in range(0, rows.numel(), chunk):
        idx = rows[i:i + chunk]
        p = _log_probs(te[idx].to(cd), temperature).exp()
        q = _log_probs(s[idx].to(cd), temperature).exp()
        acc[idx] = torch.minimum(p, q).sum(-1).clamp(0.0, 1.0)
    acc = acc.view(b, t)
    if mode == "block":
        pad = (-t) % gamma
        a = torch.cat([acc, acc.new_ones(b, pad)], 1).view(b, -1, gamma)
        excl = torch.cat([a.new_ones(b, a.shape[1], 1), a[..., :-1].cumprod(-1)], -1)  # prod of earlier offsets
        return excl.reshape(b, -1)[:, :t]
    running, total = acc.new_ones(b, t), acc.new_ones(b, t)
    for j in range(1, gamma):  # offset j: the block started j positions earlier (positions < 0 count as 1)
        shifted = torch.cat([acc.new_ones(b, j), acc[:, :-j]], 1) if j < t else acc.new_ones(b, t)
        running = running * shifted
        total = total + running
    return total / gamma


def train_entropy_edges() -> Tensor:
    """Edges of the per-step training bins: one per decade over the SD metrics' entropy range, plus [0, lo)
    and [hi, inf) (distillspec.sd.metrics.entropy_bin_edges with per_decade=1)."""
    from distillspec.sd.metrics import entropy_bin_edges

    return entropy_bin_edges(per_decade=1)


def _bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}"


@torch.no_grad()
def entropy_bin_sums(per_token: Tensor, entropy: Tensor, mask: Tensor, beta: Tensor | None = None) -> Tensor:
    """(B, T) divergence, teacher entropy, bool mask (and beta) -> (2 K + 2,) float64 sums over masked tokens:
    [count per bin (K), divergence per bin (K), sum of beta, token count]. Sums, so they add over micro-batches
    and DDP ranks; entropy_bin_metrics turns them into means."""
    edges = train_entropy_edges().to(per_token.device)
    k = edges.numel() - 1
    h, d = entropy[mask].double(), per_token.detach()[mask].double()
    idx = torch.bucketize(h, edges[1:-1], right=True)
    counts = torch.zeros(k, dtype=torch.float64, device=per_token.device).index_add_(0, idx, torch.ones_like(d))
    divs = torch.zeros(k, dtype=torch.float64, device=per_token.device).index_add_(0, idx, d)
    bsum = beta.detach()[mask].double().sum() if beta is not None else d.new_zeros(())
    return torch.cat([counts, divs, bsum.view(1), d.new_tensor([float(d.numel())])])


def entropy_bin_metrics(sums: Tensor, with_beta: bool) -> dict[str, float]:
    """Sums from entropy_bin_sums -> {train/beta_mean (if with_beta), train/div_by_entropy/<lo>-<hi> (mean
    divergence, nan for an empty bin), train/tokens_by_entropy/<lo>-<hi> (share of tokens)}."""
    from distillspec import constants as C

    edges = train_entropy_edges().tolist()
    k = len(edges) - 1
    sums = sums.double().cpu()
    counts, divs, bsum, n = sums[:k], sums[k:2 * k], float(sums[2 * k]), float(sums[2 * k + 1])
    out: dict[str, float] = {}
    if with_beta:
        out[C.TRAIN_BETA_MEAN] = bsum / n if n > 0 else math.nan
    for i in range(k):
        label = _bin_label(edges[i], edges[i + 1])
        c = float(counts[i])
        out[C.TRAIN_DIV_BY_ENTROPY + label] = float(divs[i]) / c if c > 0 else math.nan
        out[C.TRAIN_TOKENS_BY_ENTROPY + label] = c / n if n > 0 else 0.0
    return out
