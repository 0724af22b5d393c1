"""The vLLM comparison's pure parts: rates from counters, alignment of conventions, flags, commands."""

from __future__ import annotations

import math

import pytest
import torch

from distillspec import constants as C
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.sd.metrics import sd_metrics
from distillspec.serving import compare as cmp
from distillspec.serving.commands import serve_command
from distillspec.serving.ours import our_counts
from tests.sd_stubs import BigramLM


def test_counts_summary_is_vllms_formulas():
    s = cmp.counts_summary(num_drafts=10, num_draft_tokens=50, num_accepted=20, per_pos=[8, 6, 4, 2, 0])
    assert s["acceptance_rate"] == 20 / 50
    assert s["mean_acceptance_length"] == 1 + 20 / 10
    assert s["per_position"] == [0.8, 0.6, 0.4, 0.2, 0.0]
    assert math.isnan(cmp.counts_summary(0, 0, 0, [])["acceptance_rate"])


def test_iid_rate():
    assert cmp.iid_rate(1.0, 5) == 1.0 and cmp.iid_rate(0.0, 5) == 0.0
    assert cmp.iid_rate(0.5, 2) == pytest.approx((0.5 + 0.25) / 2)


def test_first_mismatch_and_counter_diffs():
    assert cmp.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert cmp.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert cmp.first_mismatch([1, 2], [1, 2, 3]) == 2
    a = cmp.counts_summary(4, 12, 6, [3, 2, 1])
    assert cmp.exact_counter_diffs(a, a) == {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                                             "per_position": [0, 0, 0]}
    b = cmp.counts_summary(5, 15, 6, [3, 2, 1])
    d = cmp.exact_counter_diffs(a, b)
    assert d["num_drafts"] == 1 and d["num_draft_tokens"] == 3 and d["per_position"] == [0, 0, 0]


def test_our_counts_from_the_engine_match_a_hand_count():
    """Our side of the table, from a stub pair with known blocks (vLLM's alignment: prefill token first)."""
    V = 5
    t_tab = torch.full((V, V), -5.0).scatter(1, torch.tensor([[1], [2], [3], [4], [0]]), 5.0)
    d_tab = torch.full((V, V), -5.0).scatter(1, torch.tensor([[1], [2], [0], [4], [0]]), 5.0)
    res = SpeculativeDecoder(BigramLM(d_tab), BigramLM(t_tab), gamma=3, temperature=0, eos_token_id=None,
                             first_token="prefill").generate(torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.long), 10)
    c = our_counts(res, 3)
    # vLLM's counting: block 4's third accepted token counts although the cap of 10 tokens drops it
    assert (c["num_drafts"], c["num_draft_tokens"], c["num_accepted_tokens"]) == (4, 12, 7)
    assert c["per_position"] == [3 / 4, 2 / 4, 2 / 4] and c["mean_acceptance_length"] == 1 + 7 / 4
    assert c["num_accepted_emitted"] == 6 and c["alpha_tok"] == 6 / 12
    assert c["outputs"] == [[1, 2, 3, 4, 0, 1, 2, 3, 4, 0]]
    # tau counts every output token per verification call, the prefill token included; vLLM does not
    assert c["tau"] == sd_metrics(res, 3)[C.BLOCK_EFFICIENCY] == 10 / 4


def test_serve_command_is_loopback_and_names_the_draft():
    cmd = serve_command("/m/target", "outputs/x/draft", 5, port=8123)
    assert "--host 127.0.0.1 --port 8123" in cmd and '"model": "outputs/x/draft"' in cmd
    assert '"num_speculative_tokens": 5' in cmd and '"method": "draft_model"' in cmd
    assert cmd.startswith("VLLM_CPU_KVCACHE_SPACE=4 .venv-vllm/bin/vllm serve ")  # copied on a CPU: a bounded KV cache
    assert serve_command("/m/target", "outputs/x/draft", 5, cuda=True).startswith(".venv-vllm/bin/vllm serve ")


def test_ratio_ci_is_sd_metrics_bootstrap():
    """serving.stats resamples prompts exactly as sd.metrics.bootstrap_ci (one convention for every CI)."""
    from distillspec.sd.metrics import bootstrap_ci
    from distillspec.serving import stats

    num, den = [3, 10, 0, 7, 5, 9, 1, 4], [10, 15, 10, 10, 12, 15, 10, 10]
    assert stats.ratio_ci(num, den) == bootstrap_ci(num, den)


def _prompts(rates, drafted=320):
    """Per-prompt (accepted, drafted) with the given per-prompt acceptance rates (64 tokens x gamma 5)."""
    return [round(r * drafted) for r in rates], [drafted] * len(rates)


def test_flag_follows_the_noise_not_a_fixed_tolerance():
    """8 prompts at T 1, ours 0.771 vs vLLM 0.695 (the 1.5B pair's numbers): the per-prompt spread
    is wider than the gap, so that is no disagreement; the same gap over many steady prompts is one."""
    from distillspec.serving import stats

    ours = _prompts([0.95, 0.55, 0.90, 0.62, 0.98, 0.70, 0.86, 0.61])      # rate 0.771
    # independent trajectories: a prompt's rate in one engine says little about its rate in the other
    vllm = _prompts([0.50, 0.85, 0.56, 0.95, 0.45, 0.90, 0.60, 0.75])      # rate 0.695
    assert sum(ours[0]) / sum(ours[1]) == pytest.approx(0.771, abs=1e-3)
    assert sum(vllm[0]) / sum(vllm[1]) == pytest.approx(0.695, abs=1e-3)
    assert abs(0.695 - 0.771) > cmp.RATE_TOLERANCE  # a fixed ±0.05 tolerance would call it a disagreement
    d = stats.diff_ci(vllm, ours)
    assert d["diff"] == pytest.approx(0.695 - 0.771, abs=2e-3) and d["lo"] < 0 < d["hi"]
    assert stats.flag_ci(d) == "agrees"
    n_needed = stats.prompts_needed(d["se"], 8)
    assert n_needed > 8  # resolving ±0.05 needs more prompts than this check had
    steady_o, steady_v = _prompts([0.77] * 64), _prompts([0.69] * 64)
    assert stats.flag_ci(stats.diff_ci(steady_v, steady_o)) == "DISAGREES"
    # a self-draft row: ours accepts everything (no spread), vLLM's CPU fault a few percent
    self_o, self_v = _prompts([1.0] * 8), _prompts([0.01, 0.0, 0.03, 0.02, 0.0, 0.01, 0.05, 0.0])
    assert stats.flag_ci(stats.diff_ci(self_v, self_o)) == "DISAGREES"
    assert stats.flag_ci({}) == "n/a" and stats.prompts_needed(float("nan"), 8) is None


def test_prompts_needed_scales_with_the_variance():
    from distillspec.serving import stats

    assert stats.prompts_needed(0.05 / stats.Z95, 8) == 8      # already ±0.05
    assert stats.prompts_needed(0.10 / stats.Z95, 8) == 32     # twice the SE: four times the prompts
    assert stats.prompts_needed(0.0, 8) == 8


def test_vllm_per_request_counts_and_mode_rows():
    from distillspec.serving import stats

    per_req = [{"acceptance_histogram": [1, 0, 2], "num_draft_tokens": 6},   # 3 drafts, 4 accepted
               {"acceptance_histogram": [2, 1, 0], "num_draft_tokens": 6}]   # 3 drafts, 1 accepted
    pp = stats.vllm_per_prompt(per_req)
    assert pp == {"drafts": [3, 3], "drafted": [6, 6], "accepted": [4, 1]}
    assert stats.vllm_per_prompt([per_req[0], None]) is None
    run = {"outputs": [[1], [2]], "counters": {"num_drafts": 6, "num_draft_tokens": 12, "num_accepted_tokens": 5,
                                               "num_accepted_tokens_per_pos": [3, 2]},
           "per_request": per_req, "num_output_tokens": 2, "generate_s": 1.0}
    v = cmp.vllm_summary(run)
    assert v["per_prompt"] == pp and v["acceptance_rate"] == 5 / 12
    ours = {"aligned": dict(cmp.counts_summary(6, 12, 6, [3, 3]), alpha_greedy_draft=0.5,
                            per_prompt={"drafts": [3, 3], "drafted": [6, 6], "accepted": [3, 3],
                                        "greedy_sum": [2.0, 3.0], "verified": [5, 5]})}
    failed = {"failed": True, "reason": "ValueError: out of memory", "log": "/r/vllm_logs/x.log"}
    rows = {r["vllm_run"]: r for r in cmp.mode_rows(ours, {"draft_probabilistic": v, "draft_default": failed}, 2)}
    assert rows["draft_default"]["flag"] == "FAILED" and rows["draft_default"]["reason"].startswith("ValueError")
    r = rows["draft_probabilistic"]
    assert r["claims"] == "standard" and r["expected"] == 0.5 and r["diff"]["diff"] == pytest.approx(5 / 12 - 0.5)
    assert r["flag"] in ("agrees", "DISAGREES") and r["vllm_ci"][0] <= 5 / 12 <= r["vllm_ci"][1]
    table = cmp.side_by_side(ours["aligned"], ours["aligned"], failed, 2)
    assert all(row[3] == "FAILED" for row in table)
    assert all(row[3] == "not run" for row in cmp.side_by_side(ours["aligned"], ours["aligned"], {"skipped": True}, 2))
