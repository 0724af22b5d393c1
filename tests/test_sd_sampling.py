"""Statistical correctness of SD sampling: outputs follow the target's distribution (lossless), the lossy
lenience rule gives the predicted first-token marginal, SKD keeps drafted tokens inside the top-k."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy import stats

from distillspec.errors import ConfigError
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.sd.sampling import NUCLEUS_FIRST_K, lenience_fn, nucleus_mask, process_logits, sample, verify_block
from tests.sd_stubs import BigramLM, exact_sequence_probs, log_table, perturbed_pair

P_MIN = 1e-3  # a correct sampler fails a single test with this probability


def _check_distribution(samples: list, probs: dict, tv_bound: float) -> None:
    """Chi-square goodness of fit (bins with expected count < 5 merged) and a total-variation bound."""
    n = len(samples)
    counts = Counter(samples)
    assert set(counts) <= {k for k, v in probs.items() if v > 0}, "sampled an outcome of probability 0"
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k, v in probs.items():
        if v * n >= 5:
            obs.append(counts.get(k, 0))
            exp.append(v * n)
        else:
            rest_o += counts.get(k, 0)
            rest_e += v * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    exp = [e * n / sum(exp) for e in exp]  # renormalise float rounding
    assert stats.chisquare(obs, exp).pvalue > P_MIN
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - v) for k, v in probs.items())
    assert tv < tv_bound


def test_process_logits_temperature_top_p_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = process_logits(logits, 1.0, 1.0)
    assert torch.allclose(p, torch.softmax(logits, -1))
    assert process_logits(logits, 0.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    full = torch.softmax(logits, -1)[0]
    nucleus = process_logits(logits, 1.0, 0.8)[0]  # 0.64 + 0.24 >= 0.8: two tokens kept
    assert (nucleus[2:] == 0).all() and torch.allclose(nucleus[:2], full[:2] / full[:2].sum())
    assert torch.allclose(process_logits(logits, 0.5), torch.softmax(logits / 0.5, -1))
    assert process_logits(torch.tensor([[0.0, -float("inf")]]), 1.0, 0.5).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("scale", [0.1, 3.0, 8.0])  # near-flat rows force the partial sort to widen
def test_nucleus_mask_equals_full_sort(scale):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(6, 3, 5000, generator=g) * scale, -1)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        sorted_p, idx = probs.sort(-1, descending=True)
        ref = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, (sorted_p.cumsum(-1) - sorted_p) < top_p)
        got = nucleus_mask(probs, top_p)
        assert torch.equal(got, ref), (scale, top_p)
    if scale == 0.1:  # the widest nucleus really is longer than the first partial sort
        assert nucleus_mask(probs, 0.9).sum(-1).max() > NUCLEUS_FIRST_K


def test_sample_follows_probs():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.expand(50_000, -1), g).tolist()
    _check_distribution(draws, dict(enumerate(probs.tolist())), 0.01)


@pytest.mark.parametrize("seed", [0, 1])
def test_verify_block_first_token_is_target_distributed(seed):
    """One block, gamma = 1: the emitted first token ~ p whatever q is (q drawn and verified per row)."""
    V, N = 6, 100_000
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(V, generator=g), 0)
    q = torch.softmax(2 * torch.randn(V, generator=g), 0)
    q_rows = q.expand(N, 1, V)
    drafted = sample(q_rows, g)
    v = verify_block(p.expand(N, 2, V), q_rows, drafted, generator=g)
    first = torch.where(v.num_accepted > 0, drafted[:, 0], v.next_token)
    _check_distribution(first.tolist(), dict(enumerate(p.tolist())), 0.01)
    assert abs(float(v.num_accepted.float().mean()) - float(torch.minimum(p, q).sum())) < 0.01


def test_engine_lossless_on_markov_stubs():
    """Whole engine (gamma = 2, three new tokens, so rows cross block boundaries) on bigram stubs: the
    distribution of 3-token outputs equals the target chain's, exactly enumerable."""
    V, N = 4, 40_000
    g = torch.Generator().manual_seed(0)
    pt = torch.softmax(1.5 * torch.randn(V, V, generator=g), -1)
    qt = torch.softmax(1.5 * torch.randn(V, V, generator=g), -1)
    dec = SpeculativeDecoder(BigramLM(qt.log()), BigramLM(pt.log()), gamma=2, eos_token_id=None)
    ids = torch.zeros(N, 1, dtype=torch.long)
    res = dec.generate(ids, torch.ones_like(ids), 3, generator=torch.Generator().manual_seed(1))
    outs = [tuple(r) for r in res.tokens.tolist()]
    exact = {}
    for a in range(V):
        for b in range(V):
            for c in range(V):
                exact[(a, b, c)] = float(pt[0, a] * pt[a, b] * pt[b, c])
    _check_distribution(outs, exact, 0.03)
    assert 0.1 < float(res.num_accepted.sum() / res.num_drafted.sum()) < 0.9


RAGGED_PROMPTS = [torch.tensor([2, 4, 5, 3]), torch.tensor([5])]


def _replicated(prompts, n: int):
    """(len(prompts) * n, L) left-padded ids and mask: each prompt repeated n times, in order."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts) * n, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, p in enumerate(prompts):
        ids[k * n:(k + 1) * n, width - len(p):], mask[k * n:(k + 1) * n, width - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("temperature,top_p,first_token", [(1.0, 1.0, "draft"), (0.7, 0.9, "draft"),
                                                         (0.7, 0.9, "prefill")])
def test_engine_lossless_with_kv_cache(temperature, top_p, first_token):
    """Tiny Llamas (vocab 6, real KV caches with holes), left-padded ragged prompts replicated N times:
    3-token outputs follow the target's processed sampling distribution."""
    draft, target = perturbed_pair(vocab=6, noise=0.15, seed=3)
    prompts, N = RAGGED_PROMPTS, 12_000
    ids, mask = _replicated(prompts, N)
    dec = SpeculativeDecoder(draft, target, gamma=2, temperature=temperature, top_p=top_p, eos_token_id=None,
                             first_token=first_token)
    res = dec.generate(ids, mask, 3, generator=torch.Generator().manual_seed(0))
    assert 0.1 < float(res.num_accepted.sum() / res.num_drafted.sum()) < 0.95
    for k, prompt in enumerate(prompts):
        outs = [tuple(r) for r in res.tokens[k * N:(k + 1) * N].tolist()]
        _check_distribution(outs, exact_sequence_probs(target, prompt, 3, temperature, top_p), 0.05)


def test_engine_lossless_past_a_sliding_window():
    """A Mistral model (every layer sliding, a window of 2 positions, vocab 6) and a noisy draft of it: 3-token
    outputs, each predicted past the window, follow the target's distribution (computed by transformers' own
    masks, no cache). Ignoring the window moves that distribution by TV 0.38-0.83; sampling noise is ~0.03."""
    from distillspec.models.tiny_families import perturbed_copy, tiny_family_model

    target = tiny_family_model("mistral", vocab_size=6, window=2, seed=3, num_layers=2)
    draft = perturbed_copy(target, 0.15, seed=4)
    prompts, N = RAGGED_PROMPTS, 12_000
    ids, mask = _replicated(prompts, N)
    dec = SpeculativeDecoder(draft, target, gamma=2, temperature=1.0, eos_token_id=None)
    res = dec.generate(ids, mask, 3, generator=torch.Generator().manual_seed(0))
    assert 0.1 < float(res.num_accepted.sum() / res.num_drafted.sum()) < 0.95
    for k, prompt in enumerate(prompts):
        outs = [tuple(r) for r in res.tokens[k * N:(k + 1) * N].tolist()]
        _check_distribution(outs, exact_sequence_probs(target, prompt, 3, 1.0, 1.0), 0.05)


@pytest.mark.parametrize("lenience,eps", [("none", 1.0), ("p_over_eps", 0.5), ("p_over_eps2", 0.6),
                                          ("p_pow_eps", 0.3)])
def test_lenience_first_token_marginal(lenience, eps):
    """P(x) = q(x) min(1, f(p(x))/q(x)) + (1 - sum_v q(v) min(1, f(p(v))/q(v))) r(x), r = norm(max(0, p - q))."""
    V, N = 5, 60_000
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(1.5 * torch.randn(V, generator=g), 0)
    q = torch.softmax(1.5 * torch.randn(V, generator=g), 0)
    accept = torch.minimum(torch.ones(V), lenience_fn(lenience, p, eps) / q)
    resid = (p - q).clamp_min(0)
    predicted = q * accept + (1 - (q * accept).sum()) * resid / resid.sum()
    dec = SpeculativeDecoder(BigramLM(log_table(q)), BigramLM(log_table(p)), gamma=1, lenience=lenience,
                             epsilon=eps, eos_token_id=None)
    ids = torch.zeros(N, 1, dtype=torch.long)
    res = dec.generate(ids, torch.ones_like(ids), 1, generator=torch.Generator().manual_seed(5))
    _check_distribution(res.tokens[:, 0].tolist(), dict(enumerate(predicted.tolist())), 0.015)
    if lenience != "none":  # lossy: more acceptance than lossless, and the output no longer follows p
        assert float(res.num_accepted.float().mean()) > float(torch.minimum(p, q).sum()) + 0.02


def test_skd_topk_rule():
    """SKD: a drafted token inside the target's top-k is kept; outside, it is replaced by a target sample."""
    V, N, k = 6, 20_000, 2
    p = torch.tensor([0.05, 0.4, 0.3, 0.1, 0.1, 0.05])
    q = torch.full((V,), 1.0 / V)
    dec = SpeculativeDecoder(BigramLM(log_table(q)), BigramLM(log_table(p)), gamma=1, acceptance="topk", top_k=k,
                             eos_token_id=None)
    ids = torch.zeros(N, 1, dtype=torch.long)
    res = dec.generate(ids, torch.ones_like(ids), 1, generator=torch.Generator().manual_seed(0))
    acc = res.trace_accepted
    drafted_first = res.tokens[:, 0]
    assert set(drafted_first[acc].tolist()) <= {1, 2}
    assert abs(float(acc.float().mean()) - 2 / V) < 0.015
    predicted = torch.zeros(V)
    predicted[1:3] += 1.0 / V
    predicted += (1 - 2 / V) * p
    _check_distribution(drafted_first.tolist(), dict(enumerate(predicted.tolist())), 0.015)


def test_lenience_rejects_bad_values():
    with pytest.raises(ConfigError, match="p_cubed"):
        lenience_fn("p_cubed", torch.ones(1), 0.5)
    with pytest.raises(ConfigError, match="epsilon=0"):
        lenience_fn("p_over_eps", torch.ones(1), 0.0)


@pytest.mark.parametrize("rule", ["rejection", "greedy", "topk"])
@pytest.mark.parametrize("bad", ["p", "q"])
def test_verify_block_refuses_non_finite_probabilities(rule, bad):
    """A NaN draft distribution is an error, never an acceptance (it would make every drafted token 'accepted')."""
    from distillspec.errors import NonFiniteError

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 4, 6, generator=g), -1)
    q = torch.softmax(torch.randn(2, 3, 6, generator=g), -1)
    (p if bad == "p" else q)[1, 1] = float("nan")
    who = r"target \(p\)" if bad == "p" else r"draft \(q\)"
    with pytest.raises(NonFiniteError, match=f"non-finite {who} probabilities"):
        verify_block(p, q, torch.zeros(2, 3, dtype=torch.long), rule=rule, generator=g)


def test_greedy_probabilities_of_nan_logits_are_nan():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [float("nan"), 0.0, 1.0]])
    probs = process_logits(logits, 0.0)
    assert probs[0].tolist() == [0.0, 1.0, 0.0] and bool(probs[1].isnan().all())
