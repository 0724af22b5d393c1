"""Engine correctness: greedy equality, batched == per-row, stubs forcing accept/reject, cache vs no-cache."""

from __future__ import annotations

import pytest
import torch

from distillspec.errors import ConfigError
from distillspec.models.tiny import tiny_llama, truncate_layers
from distillspec.sd.baseline import autoregressive_generate
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.sd.metrics import expected_tau, sd_metrics
from benchmarks.sd_nocache import generate_nocache
from tests.sd_stubs import BigramLM, log_table, perturbed_pair, ragged_prompts

LENGTHS = [3, 9, 1, 14, 6, 11]


def _rows(result):
    return [result.tokens[i, : int(result.lengths[i])].tolist() for i in range(result.lengths.shape[0])]


def _hf_greedy(model, ids, mask, n, eos=1):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    rows = []
    for r in out.tolist():
        rows.append(r[: r.index(eos) + 1] if eos in r else r)
    return rows


@pytest.fixture(scope="module")
def pair():
    return perturbed_pair(noise=0.01)


@pytest.mark.parametrize("gamma,first_token", [(1, "draft"), (3, "draft"), (5, "draft"), (8, "draft"),
                                               (1, "prefill"), (5, "prefill")])
def test_greedy_equals_target_greedy_on_ragged_batch(pair, gamma, first_token):
    draft, target = pair
    ids, mask = ragged_prompts(LENGTHS)
    ref = _hf_greedy(target, ids, mask, 48)
    res = SpeculativeDecoder(draft, target, gamma=gamma, temperature=0, eos_token_id=1, pad_token_id=0,
                             first_token=first_token).generate(ids, mask, 48)
    assert _rows(res) == ref
    alpha = float(res.num_accepted.sum() / res.num_drafted.sum())
    assert 0.05 < alpha < 0.999  # partial acceptance: holes and roll-backs were exercised


def test_greedy_with_truncated_draft_and_eos(tmp_path):
    target = tiny_llama(104, 4, seed=3)
    draft = truncate_layers(target, 1)
    ids, mask = ragged_prompts(LENGTHS, seed=5)
    for eos in (1, 37, 60):  # frequent EOS ids make rows finish at different steps
        ref = _hf_greedy(target, ids, mask, 30, eos=eos)
        res = SpeculativeDecoder(draft, target, gamma=4, temperature=0, eos_token_id=[eos], pad_token_id=0) \
            .generate(ids, mask, 30)
        assert _rows(res) == ref


def test_batched_equals_per_row_greedy(pair):
    draft, target = pair
    ids, mask = ragged_prompts(LENGTHS, seed=2)
    dec = SpeculativeDecoder(draft, target, gamma=5, temperature=0, eos_token_id=1, pad_token_id=0)
    batched = dec.generate(ids, mask, 40)
    for i, n in enumerate(LENGTHS):
        single = dec.generate(ids[i:i + 1, -n:], mask[i:i + 1, -n:], 40)
        assert _rows(single)[0] == _rows(batched)[i]
        assert int(single.num_accepted[0]) == int(batched.num_accepted[i])
        assert int(single.num_blocks[0]) == int(batched.num_blocks[i])


def test_baseline_greedy_equals_hf(pair):
    _, target = pair
    ids, mask = ragged_prompts(LENGTHS, seed=4)
    res = autoregressive_generate(target, ids, mask, 32, temperature=0, eos_token_id=1, pad_token_id=0)
    assert _rows(res) == _hf_greedy(target, ids, mask, 32)


@pytest.mark.parametrize("temperature,top_p,first_token", [(0.0, 1.0, "draft"), (1.0, 1.0, "draft"),
                                                         (0.8, 0.9, "draft"), (0.8, 0.9, "prefill")])
def test_cached_engine_equals_nocache_reference(pair, temperature, top_p, first_token):
    """Same seed, same verification math: the cache bookkeeping must not change a single token."""
    draft, target = pair
    ids, mask = ragged_prompts(LENGTHS, seed=7)
    dec = SpeculativeDecoder(draft, target, gamma=4, temperature=temperature, top_p=top_p, eos_token_id=1,
                             pad_token_id=0, first_token=first_token)
    a = dec.generate(ids, mask, 32, generator=torch.Generator().manual_seed(11))
    b = generate_nocache(dec, ids, mask, 32, generator=torch.Generator().manual_seed(11))
    assert _rows(a) == _rows(b)
    assert a.num_accepted.tolist() == b.num_accepted.tolist()


def test_draft_equal_target_accepts_everything(pair):
    _, target = pair
    ids, mask = ragged_prompts(LENGTHS, seed=8)
    gamma = 4
    res = SpeculativeDecoder(target, target, gamma=gamma, temperature=1.0, eos_token_id=None, pad_token_id=0) \
        .generate(ids, mask, 5 * (gamma + 1), generator=torch.Generator().manual_seed(0))
    m = sd_metrics(res, gamma)
    assert m["sd/alpha_tok"] == 1.0
    assert m["sd/tau"] == gamma + 1
    assert all(m[f"sd/accept_pos/{k}"] == 1.0 for k in range(1, gamma + 1))
    # argmax drafts with q taken as one-hot would be accepted only at the target's own argmax probability
    top = float(res.trace_p_draft_argmax.mean())
    assert m["sd/alpha_greedy_draft"] == pytest.approx(top) and 0.0 < top < 0.99
    assert abs(m["sd/alpha_expected"] - 1.0) < 1e-5


def test_stub_zero_acceptance():
    V = 6
    p = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2])
    q = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    dec = SpeculativeDecoder(BigramLM(log_table(q)), BigramLM(log_table(p)), gamma=3, eos_token_id=None)
    ids = torch.full((4, 2), 2, dtype=torch.long)
    res = dec.generate(ids, torch.ones_like(ids), 12, generator=torch.Generator().manual_seed(0))
    assert int(res.num_accepted.sum()) == 0
    assert (res.tokens != 0).all()  # every emitted token is a resample from norm(max(0, p - q))
    assert sd_metrics(res, 3)["sd/tau"] == 1.0
    assert res.trace_first_rejected.view(-1, 3)[:, 0].all()


def test_stub_partial_acceptance_greedy():
    """Draft agrees with the target's greedy chain on some states only: exact accept counts are known."""
    V = 5
    nxt_t = torch.tensor([1, 2, 3, 4, 0])  # target chain 0->1->2->3->4->0
    nxt_d = torch.tensor([1, 2, 0, 4, 0])  # draft wrong at state 2
    t_tab = torch.full((V, V), -5.0).scatter(1, nxt_t[:, None], 5.0)
    d_tab = torch.full((V, V), -5.0).scatter(1, nxt_d[:, None], 5.0)
    dec = SpeculativeDecoder(BigramLM(d_tab), BigramLM(t_tab), gamma=3, temperature=0, eos_token_id=None)
    ids = torch.tensor([[0]])
    res = dec.generate(ids, torch.ones_like(ids), 10)
    assert res.tokens[0].tolist() == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
    # block 1 from 0: drafts 1,2,0 -> accept 2 (1,2), emit 3; block 2 from 3: 4,0,1 all accepted + bonus 2;
    # block 3 from 2: drafts 0 -> reject, emit 3; block 4 from 3: 4,0,1 accepted, but the cap of 10 tokens
    # emits only 4,0: accepted counts emitted drafted tokens (2), so accepted <= output tokens.
    assert res.num_accepted.tolist() == [2 + 3 + 0 + 2]
    assert res.num_blocks.tolist() == [4]
    assert int(res.trace_accepted.sum()) == 8  # the trace keeps every verification outcome (vLLM's counting)


def test_stub_prefill_first_token_shifts_blocks():
    """first_token='prefill' (vLLM's alignment): the target's prefill emits the first token, blocks follow."""
    from distillspec import constants as C
    from distillspec.sd.metrics import sd_metrics

    V = 5
    nxt_t = torch.tensor([1, 2, 3, 4, 0])
    nxt_d = torch.tensor([1, 2, 0, 4, 0])
    t_tab = torch.full((V, V), -5.0).scatter(1, nxt_t[:, None], 5.0)
    d_tab = torch.full((V, V), -5.0).scatter(1, nxt_d[:, None], 5.0)
    dec = SpeculativeDecoder(BigramLM(d_tab), BigramLM(t_tab), gamma=3, temperature=0, eos_token_id=None,
                             first_token="prefill")
    ids = torch.tensor([[0]])
    res = dec.generate(ids, torch.ones_like(ids), 10)
    assert res.tokens[0].tolist() == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
    # prefill emits 1; block 1 from 1: drafts 2,0,1 -> accept 2, emit 3; block 2 from 3: 4,0,1 + bonus 2;
    # block 3 from 2: drafts 0 -> reject, emit 3; block 4 from 3: 4,0,1, the cap emits 4,0.
    assert res.num_accepted.tolist() == [1 + 3 + 0 + 2] and res.num_blocks.tolist() == [4]
    m = sd_metrics(res, 3)
    # per position and mean acceptance length count verification outcomes, as vLLM does: block 4's third
    # drafted token passed verification although the cap then dropped it
    assert [m[C.accept_pos_key(k)] for k in (1, 2, 3)] == [3 / 4, 2 / 4, 2 / 4]
    assert m[C.MEAN_ACCEPTANCE_LENGTH] == 1 + 7 / 4
    assert m[C.ALPHA_SEQ] <= 1.0


def test_prefill_first_token_can_finish_a_row():
    """A row whose prefill token is EOS (or max_new_tokens=1) ends without a block; others go on."""
    V = 5
    t_tab = torch.full((V, V), -5.0).scatter(1, torch.tensor([[1], [2], [3], [4], [0]]), 5.0)
    dec = SpeculativeDecoder(BigramLM(t_tab), BigramLM(t_tab), gamma=2, temperature=0, eos_token_id=4,
                             first_token="prefill")
    ids = torch.tensor([[3], [0]])
    res = dec.generate(ids, torch.ones_like(ids), 6)
    assert res.tokens[0, :1].tolist() == [4] and res.lengths.tolist() == [1, 4]
    assert res.num_blocks.tolist() == [0, 1] and res.tokens[1, :4].tolist() == [1, 2, 3, 4]  # 2,3 + bonus EOS
    one = dec.generate(ids, torch.ones_like(ids), 1)
    assert one.lengths.tolist() == [1, 1] and one.num_blocks.tolist() == [0, 0] and one.trace_pos.numel() == 0


def test_tau_matches_iid_formula():
    V = 8
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(V, generator=g), 0)
    q = torch.softmax(torch.randn(V, generator=g), 0)
    alpha = float(torch.minimum(p, q).sum())
    gamma = 4
    dec = SpeculativeDecoder(BigramLM(log_table(q)), BigramLM(log_table(p)), gamma=gamma, eos_token_id=None)
    ids = torch.zeros(256, 1, dtype=torch.long)
    res = dec.generate(ids, torch.ones_like(ids), 400, generator=torch.Generator().manual_seed(1))
    m = sd_metrics(res, gamma)
    assert abs(m["sd/alpha_tok"] - sum(alpha ** k for k in range(1, gamma + 1)) / gamma) < 0.01
    assert abs(m["sd/alpha_expected"] - alpha) < 0.01
    # blocks truncated by max_new_tokens bias tau slightly down; 400 tokens keep that under 1 %
    assert abs(m["sd/tau"] - expected_tau(alpha, gamma)) / expected_tau(alpha, gamma) < 0.03
    assert abs(m["sd/tau_predicted"] - m["sd/tau"]) / m["sd/tau"] < 0.03


def test_finished_rows_stop_costing_compute(pair):
    """Rows that hit EOS leave the batch: later target calls see fewer rows."""
    draft, target = pair
    calls = []
    orig = target.forward

    def spy(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return orig(*a, **kw)

    target.forward = spy
    try:
        ids, mask = ragged_prompts(LENGTHS, seed=9)
        eos = _hf_greedy(target, ids, mask, 40)[0][5]  # a token row 0 emits early
        SpeculativeDecoder(draft, target, gamma=3, temperature=0, eos_token_id=eos).generate(ids, mask, 40)
    finally:
        del target.forward
    assert calls[1] == len(LENGTHS) and min(calls) < len(LENGTHS)


def test_bad_inputs_fail_early(pair):
    draft, target = pair
    with pytest.raises(ConfigError, match="104.*50|50.*104"):
        SpeculativeDecoder(tiny_llama(50, 1), target)
    dec = SpeculativeDecoder(draft, target, gamma=3)
    long = torch.ones(1, 4050, dtype=torch.long)
    with pytest.raises(ConfigError, match="exceeds the context"):
        dec.generate(long, torch.ones_like(long), 100)
    ids, mask = ragged_prompts([2, 4])
    with pytest.raises(ConfigError, match="left-padded"):
        dec.generate(ids.flip(1), mask.flip(1), 4)


@pytest.mark.parametrize("spec,field,value", [("sd", "gamma", 0), ("sd", "top_p", 1.5), ("sd", "lenience", "p_squared"),
                                              ("sd", "epsilon", 0.0), ("sd", "first_token", "first"),
                                              ("sd", "temperature", -1.0), ("rollout", "skd_gamma", 0),
                                              ("rollout", "top_p", 0.0)])
def test_decoder_settings_are_refused_by_the_specs(spec, field, value):
    """The engine checks shapes only; every setting it takes is validated where users set it."""
    from distillspec.defaults import build_spec
    from distillspec.specs import RolloutSpec, SDSpec

    with pytest.raises(ConfigError, match=f"{field}={value!r}|{field}"):
        build_spec(SDSpec if spec == "sd" else RolloutSpec, **{field: value})
