"""SD metrics from an `SDResult`: acceptance, block efficiency, cost ratio, speedups, entropy bins.

Pure torch/Python. Names are the constants in `distillspec.constants`.
  alpha_tok  = accepted drafted tokens / drafted tokens (drafted tokens after a rejection count as not
               accepted, so for i.i.d. acceptance a it is (a + a^2 + .. + a^g) / g, below a)
  alpha_seq  = accepted drafted tokens / output tokens (DistillSpec)
  alpha_expected = mean over verified positions (accepted, or first rejected of a block) of
               sum_v min(p, q) = 1 - TV(p, q): a low-variance estimate of alpha
  tau        = output tokens / target verification calls (block efficiency)
  mean accepted length = accepted drafted tokens / blocks
  mean acceptance length (vLLM) = 1 + verified-accepted drafted tokens / blocks, counting, as vLLM does,
               accepted tokens that EOS or the token cap then cut (alpha_tok / alpha_seq count emitted ones)
  accept_pos/k = blocks whose k-th drafted token passed verification (with all earlier ones) / blocks,
               k = 1..gamma (vLLM's num_accepted_tokens_per_pos / num_drafts; same counting)
  alpha_greedy_draft = mean over verified positions of p(argmax q): the acceptance rate of vLLM's default
               draft_model scheme (argmax drafts verified as if q were one-hot) at the same positions
  tau_predicted = (1 - a^(g+1)) / (1 - a), a = alpha_expected (i.i.d. acceptance, Leviathan et al. 2023)
  cost ratio c = time per draft forward / time per target forward (measured, prefill excluded)
  speedup    = target-only wall time / SD wall time;  predicted speedup = tau / (c * gamma + 1)
  verify-cost ratio v = time per target verification call (gamma + 1 positions) / time per target-only
               decoding step (1 position), same batch; on a CPU v > 1 and tau / (c * gamma + 1) over-predicts.
  v-corrected predicted speedup = tau / (c_step * gamma + v), c_step = c * v = draft call / decoding step
               (one SD block costs gamma draft calls + one verification; target-only pays one step per token)
  auto gamma = argmax over 1..max_gamma of tau(a, g) / (c_step * g + v(g)), v(g) = 1 + (v_pilot - 1) * g / g_pilot
               (verification cost linear in the extra positions, measured once at g_pilot; `choose_gamma`)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distillspec import constants as C
from distillspec.errors import InvariantError


def expected_tau(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha); gamma + 1 at alpha = 1."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def check_counts(accepted: float, drafted: float, output: float, where: str = "the evaluation") -> None:
    """InvariantError unless accepted drafted tokens <= drafted tokens and <= output tokens (alpha_tok, alpha_seq
    <= 1): every accepted drafted token is emitted, so anything else is a counting bug or a broken model."""
    for what, bound in (("drafted tokens", drafted), ("output tokens", output)):
        if accepted > bound:
            raise InvariantError(f"{where}: accepted drafted tokens ({accepted:g}) exceed its {what} ({bound:g}), "
                                 "which cannot happen (alpha would be > 1); the SD counts are wrong, refusing to "
                                 "report them")


def sd_metrics(result, gamma: int) -> dict[str, float]:
    """Run-level metrics of one (possibly concatenated) SDResult."""
    acc = float(result.num_accepted.sum())
    drafted = float(result.num_drafted.sum())
    out = float(result.lengths.sum())
    check_counts(acc, drafted, out)
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
        C.MEAN_ACCEPTANCE_LENGTH: 1.0 + _ratio(float(result.trace_accepted.sum()), blocks),
        C.ALPHA_GREEDY_DRAFT: float(result.trace_p_draft_argmax[verified].mean()) if ap.numel() else math.nan,
        C.TAU_PREDICTED: expected_tau(a_exp, gamma) if not math.isnan(a_exp) else math.nan,
        C.COST_RATIO: cost,
        C.NUM_DRAFTED: drafted,
        C.NUM_OUTPUT_TOKENS: out,
        **per_position_acceptance(result, gamma),
    }


def per_position_acceptance(result, gamma: int) -> dict[str, float]:
    """{accept_pos_key(k): fraction of blocks whose k-th drafted token was accepted}, k = 1..gamma.

    From the trace: (N,) trace_pos in 0..gamma-1 and trace_accepted (accepted with every earlier position
    of its block, and emitted). Blocks = sum of num_blocks (every block drafts gamma tokens).
    """
    blocks = float(result.num_blocks.sum())
    acc = torch.zeros(gamma, dtype=torch.float64)
    if result.trace_pos.numel():
        acc.index_add_(0, result.trace_pos[result.trace_accepted].long(),
                       torch.ones(int(result.trace_accepted.sum()), dtype=torch.float64))
    return {C.accept_pos_key(k + 1): _ratio(float(acc[k]), blocks) for k in range(gamma)}


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
        check_counts(acc, dr, out, where=f"example {i}")
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


def paired_bootstrap_ci(num_a, den_a, num_b, den_b, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """The difference sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a) of two runs on the same N prompts, and its
    percentile CI resampling prompts with replacement, the same prompts for both (a paired bootstrap: what the
    prompts share cancels). All four: (N,) arrays, row i of each from prompt i. Returns (diff, lo, hi)."""
    import numpy as np

    parts = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    if len({len(x) for x in parts}) != 1:
        raise ValueError(f"a paired bootstrap needs the same prompts in both runs; got {[len(x) for x in parts]} "
                         "rows for (num_a, den_a, num_b, den_b)")
    na, da, nb, db = parts
    diff = nb.sum() / max(db.sum(), 1e-12) - na.sum() / max(da.sum(), 1e-12)
    if len(na) < 2 or da.sum() <= 0 or db.sum() <= 0:
        return float(diff), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(na), size=(n_boot, len(na)))
    diffs = nb[idx].sum(1) / np.maximum(db[idx].sum(1), 1e-12) - na[idx].sum(1) / np.maximum(da[idx].sum(1), 1e-12)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff), float(lo), float(hi)


def speedup_metrics(sd_time: float, target_time: float, tau: float, cost_ratio: float, gamma: int,
                    verify_ratio: float | None = None) -> dict[str, float]:
    """Measured wall-clock speedup next to the predicted tau / (c * gamma + 1) and, given the verify-cost
    ratio v, the v-corrected tau / (c * v * gamma + v)."""
    out = {C.SPEEDUP: _ratio(target_time, sd_time),
           C.SPEEDUP_PREDICTED: tau / (cost_ratio * gamma + 1.0) if not math.isnan(cost_ratio) else math.nan}
    if verify_ratio is not None:
        out[C.VERIFY_COST_RATIO] = verify_ratio
        out[C.SPEEDUP_PREDICTED_V] = _ratio(tau, verify_ratio * (cost_ratio * gamma + 1.0))
    return out


def verify_cost_ratio(target_time: float, target_calls: int, step_time: float, step_calls: int) -> float:
    """v = (target_time / target_calls) / (step_time / step_calls): a verification call vs a decoding step."""
    if target_calls < 1 or step_calls < 1:
        return math.nan
    return _ratio(target_time / target_calls, step_time / step_calls)


def predicted_speedup_curve(alpha: float, cost_step: float, verify_pilot: float, gamma_pilot: int,
                            max_gamma: int = 10) -> dict[int, float]:
    """{gamma: tau(alpha, gamma) / (cost_step * gamma + v(gamma))} for gamma in 1..max_gamma.

    cost_step: draft call / target decoding step. verify_pilot: v measured at gamma_pilot; v(gamma) =
    1 + (verify_pilot - 1) * gamma / gamma_pilot (slope clamped at 0: verifying more never gets cheaper).
    """
    if gamma_pilot < 1 or max_gamma < 1:
        raise ValueError(f"gamma_pilot={gamma_pilot} and max_gamma={max_gamma} must be >= 1")
    if any(math.isnan(x) for x in (alpha, cost_step, verify_pilot)) or cost_step < 0:
        raise ValueError(f"auto gamma needs measured alpha, c and v; got alpha={alpha}, c_step={cost_step}, "
                         f"v={verify_pilot}")
    slope = max(0.0, (verify_pilot - 1.0) / gamma_pilot)
    a = min(max(alpha, 0.0), 1.0)
    return {g: expected_tau(a, g) / (cost_step * g + 1.0 + slope * g) for g in range(1, max_gamma + 1)}


def choose_gamma(alpha: float, cost_step: float, verify_pilot: float, gamma_pilot: int,
                 max_gamma: int = 10) -> int:
    """The gamma in 1..max_gamma maximising the predicted speedup (`predicted_speedup_curve`); ties -> smaller."""
    curve = predicted_speedup_curve(alpha, cost_step, verify_pilot, gamma_pilot, max_gamma)
    best = max(curve.values())
    return min(g for g, s in curve.items() if s >= best * (1 - 1e-12))


ENTROPY_BIN_LO = C.ENTROPY_BIN_LO  # nats; entropies below fall in [0, lo)
ENTROPY_BIN_HI = C.ENTROPY_BIN_HI  # nats; the top bin [hi, inf)


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
