"""SD metrics from an `SDResult`: acceptance, block efficiency, cost ratio, speedups, entropy bins.

Pure torch/Python. Names are the constants in `distillspec.constants`.
  alpha_tok  = accepted drafted tokens / drafted tokens (drafted tokens after a rejection count as not
               accepted, so for i.i.d. acceptance a it is (a + a^2 + .. + a^g) / g, below a)
  alpha_seq  = accepted drafted tokens / output tokens (DistillSpec)
  alpha_expected = mean over verified positions (accepted, or first rejected of a block) of
               sum_v min(p, q) = 1 - TV(p, q): a low-variance estimate of alpha
  tau        = output tokens / target verification calls (block efficiency)
  mean accepted length = accepted drafted tokens / blocks
  tau_predicted = (1 - a^(g+1)) / (1 - a), a = alpha_expected (i.i.d. acceptance, Leviathan et al. 2023)
  cost ratio c = time per draft forward / time per target forward (measured, prefill excluded)
  speedup    = target-only wall time / SD wall time;  predicted speedup = tau / (c * gamma + 1)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distillspec import constants as C


def expected_tau(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha); gamma + 1 at alpha = 1."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def sd_metrics(result, gamma: int) -> dict[str, float]:
    """Run-level metrics of one (possibly concatenated) SDResult."""
    acc = float(result.num_accepted.sum())
    drafted = float(result.num_drafted.sum())
    out = float(result.lengths.sum())
    blocks = float(result.num_blocks.sum())
    alpha = _ratio(acc, drafted)
    verified = result.trace_accepted | result.trace_first_rejected
    ap = result.trace_accept_prob[verified]
    a_exp = float(ap.mean()) if ap.numel() else math.nan
    draft_calls, target_calls = max(result.num_draft_calls, 1), max(result.num_target_calls, 1)
    cost = _ratio(result.time_draft / draft_calls, result.time_target / target_calls)
    return {
        C.ALPHA_TOK: alpha,
        C.ALPHA_SEQ: _ratio(acc, out),
        C.ALPHA_EXPECTED: a_exp,
        C.BLOCK_EFFICIENCY: _ratio(out, blocks),
        C.MEAN_ACCEPTED_LEN: _ratio(acc, blocks),
        C.TAU_PREDICTED: expected_tau(a_exp, gamma) if not math.isnan(a_exp) else math.nan,
        C.COST_RATIO: cost,
        C.NUM_DRAFTED: drafted,
        C.NUM_OUTPUT_TOKENS: out,
    }


def per_example_metrics(result, gamma: int) -> list[dict[str, Any]]:
    """One dict per row: counts (num_accepted, num_drafted, num_output_tokens, num_blocks, num_verified and
    expected_accepted = sum of 1 - TV over its verified positions) and its alphas/tau."""
    verified = result.trace_accepted | result.trace_first_rejected
    n = result.lengths.shape[0]
    rows_v = result.trace_row[verified].long()
    n_ver = torch.zeros(n, dtype=torch.float64).index_add_(0, rows_v, torch.ones_like(rows_v, dtype=torch.float64))
    exp_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, rows_v, result.trace_accept_prob[verified].double())
    rows = []
    for i in range(n):
        acc, dr = int(result.num_accepted[i]), int(result.num_drafted[i])
        out, bl = int(result.lengths[i]), int(result.num_blocks[i])
        rows.append({"num_accepted": acc, "num_drafted": dr, "num_output_tokens": out, "num_blocks": bl,
                     "num_verified": int(n_ver[i]), "expected_accepted": float(exp_sum[i]),
                     C.ALPHA_TOK: _ratio(acc, dr), C.ALPHA_SEQ: _ratio(acc, out),
                     C.ALPHA_EXPECTED: _ratio(float(exp_sum[i]), float(n_ver[i])),
                     C.BLOCK_EFFICIENCY: _ratio(out, bl)})
    return rows


# Run-level ratio metrics as (numerator, denominator) columns of per_example_metrics: their bootstrap CIs
# resample examples (clusters of positions), not positions.
RATIO_PARTS = {C.ALPHA_EXPECTED: ("expected_accepted", "num_verified"), C.ALPHA_TOK: ("num_accepted", "num_drafted"),
               C.ALPHA_SEQ: ("num_accepted", "num_output_tokens"), C.BLOCK_EFFICIENCY: ("num_output_tokens", "num_blocks")}


def bootstrap_ci(num, den, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of sum(num)/sum(den) resampling examples with replacement. num, den: (N,) arrays."""
    import numpy as np

    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) < 2 or den.sum() <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def speedup_metrics(sd_time: float, target_time: float, tau: float, cost_ratio: float, gamma: int) -> dict[str, float]:
    """Measured wall-clock speedup next to the predicted tau / (c * gamma + 1)."""
    return {C.SPEEDUP: _ratio(target_time, sd_time),
            C.SPEEDUP_PREDICTED: tau / (cost_ratio * gamma + 1.0) if not math.isnan(cost_ratio) else math.nan}


ENTROPY_BIN_LO = 1e-4  # nats; entropies below fall in [0, lo)
ENTROPY_BIN_HI = 10.0  # nats; a 49k-152k vocabulary reaches ~11, so the top bin [hi, inf) stays small


def entropy_bin_edges(lo: float = ENTROPY_BIN_LO, hi: float = ENTROPY_BIN_HI, per_decade: int = 2) -> torch.Tensor:
    """Log-spaced edges from lo to hi; entropies below lo fall in [0, lo), above hi in [hi, inf)."""
    n = int(round(math.log10(hi / lo) * per_decade))
    inner = torch.logspace(math.log10(lo), math.log10(hi), n + 1, dtype=torch.float64)
    return torch.cat([torch.tensor([0.0], dtype=torch.float64), inner, torch.tensor([math.inf], dtype=torch.float64)])


def entropy_bins(entropy: torch.Tensor, accepted: torch.Tensor, record: torch.Tensor, *, min_count: int = 5,
                 lo: float = ENTROPY_BIN_LO, hi: float = ENTROPY_BIN_HI, per_decade: int = 2) -> list[dict[str, float]]:
    """Acceptance rate per teacher-entropy bin.

    entropy, accepted, record: (N,) per drafted position; only `record`ed positions count (the reference
    study records every accepted position and the first rejected one of each block). Bins with fewer
    than `min_count` positions are dropped. Returns [{bin_lo, bin_hi, count, acceptance}], ascending.
    """
    edges = entropy_bin_edges(lo, hi, per_decade)
    ent = entropy[record].double()
    acc = accepted[record].double()
    idx = torch.bucketize(ent, edges[1:-1], right=True)  # 0 .. len(edges)-2
    out = []
    for b in range(len(edges) - 1):
        sel = idx == b
        count = int(sel.sum())
        if count >= max(min_count, 1):
            out.append({"bin_lo": float(edges[b]), "bin_hi": float(edges[b + 1]), "count": float(count),
                        "acceptance": float(acc[sel].mean())})
    return out
