"""The vLLM comparison's pure parts: rates from counters, alignment of conventions, flags, commands."""

from __future__ import annotations

import math

import pytest
import torch

from distillspec import constants as C
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.sd.metrics import sd_metrics
from distillspec.serving import compare as cmp
from distillspec.vllm_check import our_counts, serve_command
from tests.sd_stubs import BigramLM


def test_counts_summary_is_vllms_formulas():
    s = cmp.counts_summary(num_drafts=10, num_draft_tokens=50, num_accepted=20, per_pos=[8, 6, 4, 2, 0])
    assert s["acceptance_rate"] == 20 / 50
    assert s["mean_acceptance_length"] == 1 + 20 / 10
    assert s["per_position"] == [0.8, 0.6, 0.4, 0.2, 0.0]
    assert math.isnan(cmp.counts_summary(0, 0, 0, [])["acceptance_rate"])


def test_iid_rate_and_flags():
    assert cmp.iid_rate(1.0, 5) == 1.0 and cmp.iid_rate(0.0, 5) == 0.0
    assert cmp.iid_rate(0.5, 2) == pytest.approx((0.5 + 0.25) / 2)
    assert cmp.flag(0.004, 1.0) == "DISAGREES" and cmp.flag(0.98, 1.0) == "agrees"
    assert cmp.flag(float("nan"), 1.0) == "n/a"


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
