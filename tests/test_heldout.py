"""Held-out expected acceptance (distillspec.acceptance, distillspec.heldout): the math against SD's processed
distributions, masks, and the measure on the tiny pair against a brute-force computation."""

from __future__ import annotations

import pytest
import torch

from distillspec import constants as C
from distillspec.acceptance import draft_processed_at, position_acceptance, prompt_sums, target_processed
from distillspec.sd.sampling import process_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def stored(logits, temperature, k):
    """What a teacher cache stores: the top-k log-probs at `temperature` (1 when greedy), sorted, and their ids."""
    return torch.log_softmax(logits / (temperature or 1.0), -1).topk(k, -1)


@pytest.mark.parametrize("temperature, top_p", [(0.6, 0.95), (1.0, 1.0), (0.0, 1.0), (0.7, 0.5)])
def test_alpha_is_sum_min_of_sds_processed_distributions(temperature, top_p):
    g = torch.Generator().manual_seed(0)
    t_logits, d_logits = torch.randn(50, 30, generator=g) * 3, torch.randn(50, 30, generator=g) * 3
    vals, idx = stored(t_logits, temperature, 30)  # k = V: exact everywhere
    p, complete = target_processed(vals, temperature, top_p)
    assert bool(complete.all())
    torch.testing.assert_close(p, process_logits(t_logits, temperature, top_p).gather(-1, idx))
    q_at, q_tail = draft_processed_at(d_logits, idx, temperature, top_p)
    full_p, full_q = process_logits(t_logits, temperature, top_p), process_logits(d_logits, temperature, top_p)
    torch.testing.assert_close(position_acceptance(p, q_at), torch.minimum(full_p, full_q).sum(-1))
    torch.testing.assert_close(q_tail, torch.zeros(50), atol=1e-6, rtol=0)


def test_greedy_acceptance_is_argmax_agreement():
    g = torch.Generator().manual_seed(1)
    t_logits, d_logits = torch.randn(40, 20, generator=g), torch.randn(40, 20, generator=g)
    vals, idx = stored(t_logits, 0.0, 4)
    alpha = position_acceptance(target_processed(vals, 0.0, 1.0)[0], draft_processed_at(d_logits, idx, 0.0, 1.0)[0])
    assert torch.equal(alpha, (t_logits.argmax(-1) == d_logits.argmax(-1)).float())


def test_a_nucleus_beyond_the_stored_top_k_is_flagged():
    logits = torch.zeros(2, 100)  # flat: the 0.95 nucleus holds 95 tokens
    logits[1, 0] = 20.0  # peaked: one token
    vals, _ = stored(logits, 1.0, 8)
    p, complete = target_processed(vals, 1.0, 0.95)
    assert complete.tolist() == [False, True]
    torch.testing.assert_close(p[1], torch.tensor([1.0] + [0.0] * 7))
    torch.testing.assert_close(p[0], torch.full((8,), 0.01 / 0.95))  # cut at k, normalised by top_p


def test_prompt_sums_use_only_masked_positions():
    values = torch.tensor([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    num, den = prompt_sums(values, mask)
    assert num.tolist() == [0.75, 1.0] and den.tolist() == [2.0, 1.0]


@pytest.mark.parametrize("temperature, top_p", [(0.6, 0.95), (0.0, 1.0)])
def test_measure_equals_brute_force_on_the_tiny_pair(tiny_pair_dirs, monkeypatch, temperature, top_p):
    """k = V: the stored data's acceptance equals sum-min of both models' processed distributions along the stored
    target samples, computed from full logits; the target as its own draft accepts everything."""
    from distillspec import heldout
    from distillspec.models.forward import completion_logits
    from distillspec.models.loading import PairSpec
    from distillspec.defaults import build_spec
    from distillspec.tasks.base import PromptBatchItem

    pair = build_spec(PairSpec, draft=str(tiny_pair_dirs[0]), target=str(tiny_pair_dirs[1]),
                      dtype="float32").load("cpu")
    draft, target = pair.draft, pair.target
    monkeypatch.setattr(heldout, "HELDOUT_TOP_K", target.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    items = [PromptBatchItem(uid=str(i), input_ids=torch.randint(5, 60, (3 + i,), generator=g).tolist(),
                             prompt_text="", reference=None, target_ids=None) for i in range(6)]
    cache = heldout.build_heldout(target, items, temperature=temperature, top_p=top_p, max_new_tokens=8,
                                  eos_ids=[2], pad_id=0, device="cpu", seed=0, batch_size=4)
    rep = heldout.measure(draft, cache, temperature=temperature, top_p=top_p, device="cpu", batch_size=4)
    roll = cache.rollout(list(range(6)), "cpu")
    mask = roll.completion_mask()
    with torch.no_grad():
        p = process_logits(completion_logits(target, roll), temperature, top_p)
        q = process_logits(completion_logits(draft, roll), temperature, top_p)
    brute = torch.minimum(p, q).sum(-1)[mask]
    assert rep.metrics[C.ALPHA_HELDOUT] == pytest.approx(float(brute.mean()), abs=1e-5)
    assert rep.metrics[C.HELDOUT_POSITIONS] == mask.sum() and rep.metrics[C.HELDOUT_TRUNCATED] == 0.0
    assert rep.metrics[C.ALPHA_HELDOUT_LO] <= rep.metrics[C.ALPHA_HELDOUT] <= rep.metrics[C.ALPHA_HELDOUT_HI]
    assert len(rep.per_example) == 6
    same = heldout.measure(target, cache, temperature=temperature, top_p=top_p, device="cpu", batch_size=4)
    assert same.metrics[C.ALPHA_HELDOUT] == pytest.approx(1.0, abs=1e-5)
