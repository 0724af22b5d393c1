"""distillspec.sd.metrics on hand-built inputs: every number below is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distillspec import constants as C
from distillspec.sd.engine import SDResult
from distillspec.sd.metrics import (entropy_bin_edges, entropy_bins, expected_tau, per_example_metrics, sd_metrics,
                                    speedup_metrics)

GAMMA = 3


def _result(accepted_per_block: list[list[int]], lengths: list[int], accept_prob: list[float] | None = None,
            **timing) -> SDResult:
    """An SDResult for rows whose blocks accepted the given numbers of drafted tokens (gamma = GAMMA).

    Traces follow the engine: per block GAMMA positions, the first n accepted, position n (if n < GAMMA)
    first rejected. accept_prob: one value per trace entry (default 0.5 everywhere).
    """
    row, block, pos, acc, first_rej = [], [], [], [], []
    for r, blocks in enumerate(accepted_per_block):
        for b, n in enumerate(blocks):
            for j in range(GAMMA):
                row.append(r)
                block.append(b)
                pos.append(j)
                acc.append(j < n)
                first_rej.append(j == n)
    n_trace = len(row)
    ap = torch.tensor(accept_prob if accept_prob is not None else [0.5] * n_trace)
    assert ap.numel() == n_trace
    num_blocks = torch.tensor([len(b) for b in accepted_per_block])
    B = len(lengths)
    return SDResult(
        tokens=torch.zeros(B, max(lengths), dtype=torch.long), lengths=torch.tensor(lengths),
        num_blocks=num_blocks, num_drafted=num_blocks * GAMMA,
        num_accepted=torch.tensor([sum(b) for b in accepted_per_block]),
        trace_row=torch.tensor(row, dtype=torch.long), trace_block=torch.tensor(block, dtype=torch.long),
        trace_pos=torch.tensor(pos, dtype=torch.long), trace_accepted=torch.tensor(acc, dtype=torch.bool),
        trace_first_rejected=torch.tensor(first_rej, dtype=torch.bool), trace_p=torch.full((n_trace,), 0.5),
        trace_q=torch.full((n_trace,), 0.5), trace_entropy=torch.zeros(n_trace), trace_accept_prob=ap,
        trace_p_draft_argmax=torch.full((n_trace,), 0.25), **timing)


# Row 0: blocks accepting 3 (all, + bonus) and 1 -> 4 + 2 = 6 output tokens.
# Row 1: blocks accepting 0, 2, 0 -> 2 + 3 = 5 output tokens.
BLOCKS = [[3, 1], [0, 2, 0]]
LENGTHS = [6, 5]


def test_sd_metrics_counts_and_ratios():
    # Verified positions (accepted or first rejected): 3 + 2 + 1 + 3 + 1 = 10 of 15. Give them 0.9 and the
    # 5 unverified ones 0.0, so alpha_expected is 0.9 only when the unverified ones are left out.
    probe = _result(BLOCKS, LENGTHS)
    verified = probe.trace_accepted | probe.trace_first_rejected
    assert int(verified.sum()) == 10
    ap = torch.where(verified, torch.tensor(0.9), torch.tensor(0.0)).tolist()
    res = _result(BLOCKS, LENGTHS, ap, time_draft=1.2, num_draft_calls=12, time_target=1.0, num_target_calls=5,
                  time_total=3.0, time_prefill=0.5)
    m = sd_metrics(res, GAMMA)
    assert m[C.ALPHA_TOK] == pytest.approx(6 / 15)  # accepted / drafted (5 blocks * 3)
    assert m[C.ALPHA_SEQ] == pytest.approx(6 / 11)  # accepted / output tokens
    assert m[C.BLOCK_EFFICIENCY] == pytest.approx(11 / 5)  # output tokens / blocks
    assert m[C.MEAN_ACCEPTED_LEN] == pytest.approx(6 / 5)
    assert m[C.ALPHA_EXPECTED] == pytest.approx(0.9)
    assert m[C.TAU_PREDICTED] == pytest.approx((1 - 0.9 ** 4) / (1 - 0.9))
    assert m[C.COST_RATIO] == pytest.approx((1.2 / 12) / (1.0 / 5))  # 0.1 s / 0.2 s per call = 0.5
    assert m[C.NUM_DRAFTED] == 15 and m[C.NUM_OUTPUT_TOKENS] == 11


def test_sd_metrics_degenerate_inputs_give_nan_not_errors():
    empty = _result([[], []], [1, 1])  # no blocks, no traces, no timings
    m = sd_metrics(empty, GAMMA)
    for key in (C.ALPHA_TOK, C.BLOCK_EFFICIENCY, C.MEAN_ACCEPTED_LEN, C.ALPHA_EXPECTED, C.TAU_PREDICTED,
                C.COST_RATIO):
        assert math.isnan(m[key]), key
    assert m[C.ALPHA_SEQ] == 0.0 and m[C.NUM_OUTPUT_TOKENS] == 2
    # Zero recorded calls count as one (no division by zero); zero target time gives nan cost ratio.
    r = _result(BLOCKS, LENGTHS, time_draft=0.3, num_draft_calls=0, time_target=0.6, num_target_calls=0)
    assert sd_metrics(r, GAMMA)[C.COST_RATIO] == pytest.approx(0.5)


def test_per_example_metrics():
    rows = per_example_metrics(_result(BLOCKS + [[]], LENGTHS + [1]), GAMMA)
    assert len(rows) == 3
    r0, r1, r2 = rows
    assert (r0["num_accepted"], r0["num_drafted"], r0["num_output_tokens"], r0["num_blocks"]) == (4, 6, 6, 2)
    assert r0[C.ALPHA_TOK] == pytest.approx(4 / 6) and r0[C.ALPHA_SEQ] == pytest.approx(4 / 6)
    assert r0[C.BLOCK_EFFICIENCY] == pytest.approx(3.0)
    assert (r1["num_accepted"], r1["num_drafted"], r1["num_output_tokens"], r1["num_blocks"]) == (2, 9, 5, 3)
    assert r1[C.ALPHA_TOK] == pytest.approx(2 / 9) and r1[C.ALPHA_SEQ] == pytest.approx(2 / 5)
    assert r1[C.BLOCK_EFFICIENCY] == pytest.approx(5 / 3)
    assert math.isnan(r2[C.ALPHA_TOK]) and math.isnan(r2[C.BLOCK_EFFICIENCY]) and r2[C.ALPHA_SEQ] == 0.0
    # Row-level counts add up to the run-level ones.
    run = sd_metrics(_result(BLOCKS, LENGTHS), GAMMA)
    assert sum(r["num_accepted"] for r in rows) / sum(r["num_drafted"] for r in rows) == \
        pytest.approx(run[C.ALPHA_TOK])


@pytest.mark.parametrize("gamma", [1, 3, 5, 8])
def test_expected_tau_edges(gamma):
    assert expected_tau(1.0, gamma) == gamma + 1
    assert expected_tau(0.0, gamma) == 1.0
    assert expected_tau(1.0 - 1e-9, gamma) == pytest.approx(gamma + 1, rel=1e-6)  # continuous at alpha = 1
    a = 0.6
    assert expected_tau(a, gamma) == pytest.approx(sum(a ** k for k in range(gamma + 1)))


def test_speedup_metrics():
    m = speedup_metrics(sd_time=2.0, target_time=6.0, tau=3.0, cost_ratio=0.1, gamma=5)
    assert m[C.SPEEDUP] == pytest.approx(3.0)
    assert m[C.SPEEDUP_PREDICTED] == pytest.approx(3.0 / (0.1 * 5 + 1))
    assert speedup_metrics(1.0, 1.0, 1.0, 0.0, 5)[C.SPEEDUP_PREDICTED] == pytest.approx(1.0)  # free draft
    m = speedup_metrics(sd_time=0.0, target_time=1.0, tau=2.0, cost_ratio=math.nan, gamma=3)
    assert math.isnan(m[C.SPEEDUP]) and math.isnan(m[C.SPEEDUP_PREDICTED])


def test_entropy_bin_edges_log_spaced():
    edges = entropy_bin_edges(hi=1.0)
    assert edges[0] == 0.0 and math.isinf(edges[-1])
    inner = edges[1:-1]
    assert inner[0] == pytest.approx(1e-4) and inner[-1] == pytest.approx(1.0)
    assert len(inner) == 9  # 4 decades, 2 bins per decade
    ratios = inner[1:] / inner[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 10 ** 0.5))
    assert len(entropy_bin_edges(1e-3, 10.0, per_decade=1)) == 4 + 1 + 2


def test_entropy_bins_exact_on_hand_made_example():
    # (entropy, accepted, recorded)
    positions = (
        [(5e-5, a, True) for a in (1, 1, 1, 0, 1)]            # bin [0, 1e-4): 5 recorded, 4 accepted
        + [(1e-4, 1, True)] * 2 + [(2e-4, 0, True)] * 3       # bin [1e-4, 10^-3.5): edge value goes right
        + [(0.05, a, True) for a in (1, 0, 1, 0, 1, 0)]       # bin [10^-1.5, 0.1): 6 recorded, 3 accepted
        + [(0.05, 1, False)] * 10                             # not recorded: must not count
        + [(2.0, 1, True), (50.0, 0, True)]                   # bin [1, inf): only 2 -> dropped at min_count 5
        + [(0.5, 1, True)] * 4                                # bin [10^-0.5, 1): 4 -> dropped at min_count 5
    )
    ent = torch.tensor([p[0] for p in positions], dtype=torch.float64)  # 1e-4 exactly on the edge
    acc = torch.tensor([bool(p[1]) for p in positions])
    rec = torch.tensor([p[2] for p in positions])
    bins = entropy_bins(ent, acc, rec, min_count=5, hi=1.0)
    got = [(b["bin_lo"], b["bin_hi"], b["count"], b["acceptance"]) for b in bins]
    assert [g[2] for g in got] == [5, 5, 6]
    assert got[0][:2] == (0.0, pytest.approx(1e-4)) and got[0][3] == pytest.approx(4 / 5)
    assert got[1][:2] == (pytest.approx(1e-4), pytest.approx(10 ** -3.5)) and got[1][3] == pytest.approx(2 / 5)
    assert got[2][:2] == (pytest.approx(10 ** -1.5), pytest.approx(0.1)) and got[2][3] == pytest.approx(3 / 6)
    # Lower min_count keeps the small bins, in ascending order, the top bin open-ended.
    small = entropy_bins(ent, acc, rec, min_count=2, hi=1.0)
    assert [b["count"] for b in small] == [5, 5, 6, 4, 2]
    assert small[3]["bin_lo"] == pytest.approx(10 ** -0.5) and small[3]["acceptance"] == 1.0
    assert small[4]["bin_lo"] == pytest.approx(1.0) and math.isinf(small[4]["bin_hi"])
    assert small[4]["acceptance"] == pytest.approx(0.5)
    # min_count <= 0 still drops empty bins.
    assert len(entropy_bins(ent, acc, rec, min_count=0, hi=1.0)) == 5
    # Nothing recorded: no bins.
    assert entropy_bins(ent, acc, torch.zeros_like(rec), min_count=1, hi=1.0) == []


def test_entropy_bins_counts_only_recorded_positions():
    ent = torch.full((8,), 0.05)
    acc = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    rec = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    (b,) = entropy_bins(ent, acc, rec, min_count=1, hi=1.0)
    assert b["count"] == 3 and b["acceptance"] == pytest.approx(2 / 3)


# Counts that cannot happen (more accepted drafted tokens than output or drafted tokens,
# e.g. alpha_seq 1.25 from a NaN draft) are an error, never a reported value.
@pytest.mark.parametrize("fn", [sd_metrics, per_example_metrics])
def test_more_accepted_than_output_tokens_is_an_error(fn):
    from distillspec.errors import InvariantError

    with pytest.raises(InvariantError, match=r"accepted drafted tokens \(3\) exceed.*output tokens \(2\)"):
        fn(_result([[3]], [2]), GAMMA)


def test_more_accepted_than_drafted_is_an_error():
    from distillspec.errors import InvariantError

    res = _result([[3]], [4])
    res.num_drafted = torch.tensor([2])
    with pytest.raises(InvariantError, match=r"accepted drafted tokens \(3\) exceed.*drafted tokens \(2\)"):
        sd_metrics(res, GAMMA)
