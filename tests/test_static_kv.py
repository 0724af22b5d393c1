"""kv="static" (preallocated cache, fixed shapes) decodes exactly like kv="dynamic", and its options fail early."""

from __future__ import annotations

import pytest
import torch

from distillspec.errors import ConfigError
from distillspec.models.tiny import tiny_llama, truncate_layers
from distillspec.sd import static_cache
from distillspec.sd.baseline import autoregressive_generate
from distillspec.sd.clock import ForwardTimer
from distillspec.sd.engine import SpeculativeDecoder
from tests.sd_stubs import BigramLM, perturbed_pair, ragged_prompts

LENGTHS = [3, 9, 1, 14, 6, 11]
EXACT = ("tokens", "lengths", "num_blocks", "num_drafted", "num_accepted", "trace_row", "trace_block", "trace_pos",
         "trace_accepted", "trace_first_rejected")
CLOSE = ("trace_p", "trace_q", "trace_entropy", "trace_accept_prob")


def _rows(result):
    return [result.tokens[i, : int(result.lengths[i])].tolist() for i in range(result.lengths.shape[0])]


def _both(draft, target, ids, mask, n, seed=None, **kw):
    """(dynamic, static) SDResults of the same settings and generator seed."""
    out = []
    for kv in ("dynamic", "static"):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        out.append(SpeculativeDecoder(draft, target, kv=kv, **kw).generate(ids, mask, n, generator=gen))
    return out


def _assert_same(a, b):
    for f in EXACT:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in CLOSE:
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=1e-5, rtol=1e-5, msg=f)


@pytest.fixture(scope="module")
def pair(one_thread):
    return perturbed_pair(noise=0.01)


@pytest.mark.parametrize("gamma", [1, 5])
def test_greedy_static_equals_target_and_dynamic(pair, gamma):
    draft, target = pair
    ids, mask = ragged_prompts(LENGTHS)
    ref = autoregressive_generate(target, ids, mask, 32, temperature=0, eos_token_id=1, pad_token_id=0)
    dyn, sta = _both(draft, target, ids, mask, 32, gamma=gamma, temperature=0, eos_token_id=1, pad_token_id=0)
    assert _rows(sta) == _rows(ref) == _rows(dyn)
    _assert_same(dyn, sta)
    assert 0.05 < float(sta.num_accepted.sum() / sta.num_drafted.sum()) < 0.999  # holes and roll-backs happened


@pytest.mark.parametrize("gamma,temperature,top_p", [(1, 1.0, 1.0), (5, 1.0, 1.0), (5, 0.8, 0.9)])
def test_sampled_static_equals_dynamic_with_same_seed(pair, gamma, temperature, top_p):
    """Same generator seed: identical tokens and acceptance traces (p, q equal up to float rounding)."""
    draft, target = pair
    ids, mask = ragged_prompts(LENGTHS, seed=7)
    dyn, sta = _both(draft, target, ids, mask, 32, seed=11, gamma=gamma, temperature=temperature, top_p=top_p,
                     eos_token_id=1, pad_token_id=0)
    _assert_same(dyn, sta)
    assert sta.time_draft > 0 and sta.time_target > 0 and sta.time_prefill > 0
    assert sta.time_draft + sta.time_target + sta.time_prefill <= sta.time_total


def test_rows_finishing_at_different_times(one_thread):
    """Frequent EOS ids: rows leave at different blocks; on the static path they stay in the batch, ignored."""
    target = tiny_llama(104, 4, seed=3)
    draft = truncate_layers(target, 1)
    ids, mask = ragged_prompts(LENGTHS, seed=5)
    shapes = []
    hook = target.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                            with_kwargs=True)
    free = _rows(autoregressive_generate(target, ids, mask, 30, temperature=0, pad_token_id=0))
    ends = {t: {r.index(t) if t in r else 30 for r in free} for t in range(4, 104)}
    eos_ids = [t for t in sorted(ends) if len(ends[t]) > 2][:2]  # ids that end rows at > 2 different steps
    assert len(eos_ids) == 2
    try:
        for eos in eos_ids:
            ref = autoregressive_generate(target, ids, mask, 30, temperature=0, eos_token_id=[eos], pad_token_id=0)
            shapes.clear()
            dyn, sta = _both(draft, target, ids, mask, 30, gamma=4, temperature=0, eos_token_id=[eos], pad_token_id=0)
            assert _rows(sta) == _rows(ref) == _rows(dyn)
            _assert_same(dyn, sta)
            assert len(set(sta.lengths.tolist())) > 2  # rows did finish at different times
            static_calls = shapes[len(shapes) // 2 + 1:]  # after the dynamic run and the static prefill
            assert {s[0] for s in static_calls} == {len(LENGTHS)} and {s[1] for s in static_calls} == {5}
    finally:
        hook.remove()


def test_forced_compaction_when_columns_run_out(pair, monkeypatch):
    """compact_at=1 never compacts by hole fraction: the static cache fills with holes and compacts in reserve()."""
    draft, target = pair
    calls = []
    orig = static_cache.StaticKV.compact
    monkeypatch.setattr(static_cache.StaticKV, "compact", lambda self: (calls.append(self.ptr), orig(self))[1])
    ids, mask = ragged_prompts(LENGTHS, seed=3)
    dyn, sta = _both(draft, target, ids, mask, 40, seed=2, gamma=5, temperature=1.0, eos_token_id=None,
                     pad_token_id=0, compact_at=1.0)
    assert calls, "the static cache never ran out of columns"
    _assert_same(dyn, sta)


def test_bigram_stub_partial_acceptance_static():
    V = 5
    nxt_t, nxt_d = torch.tensor([1, 2, 3, 4, 0]), torch.tensor([1, 2, 0, 4, 0])
    t_tab = torch.full((V, V), -5.0).scatter(1, nxt_t[:, None], 5.0)
    d_tab = torch.full((V, V), -5.0).scatter(1, nxt_d[:, None], 5.0)
    dec = SpeculativeDecoder(BigramLM(d_tab), BigramLM(t_tab), gamma=3, temperature=0, eos_token_id=None, kv="static")
    ids = torch.tensor([[0]])
    res = dec.generate(ids, torch.ones_like(ids), 10)
    assert res.tokens[0].tolist() == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
    # the last block (4,0,1 accepted) is cut by the 10-token cap after 4,0: 2 + 3 + 0 + 2 accepted tokens emitted
    assert res.num_accepted.tolist() == [7] and res.num_blocks.tolist() == [4]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_autoregressive_static_equals_dynamic(pair, temperature):
    _, target = pair
    ids, mask = ragged_prompts(LENGTHS, seed=4)
    out, seen = {}, {}
    for kv in ("dynamic", "static"):
        seen[kv] = []
        out[kv] = autoregressive_generate(
            target, ids, mask, 24, temperature=temperature, generator=torch.Generator().manual_seed(5),
            eos_token_id=[1, 40], pad_token_id=0, kv=kv,
            logits_hook=lambda rows, t, logits, kv=kv: seen[kv].append((rows.tolist(), logits.clone())))
    a, b = out["dynamic"], out["static"]
    assert _rows(a) == _rows(b) and a.num_calls == b.num_calls
    assert len(set(a.lengths.tolist())) > 1  # EOS ended some rows early
    assert [r for r, _ in seen["dynamic"]] == [r for r, _ in seen["static"]]
    for (_, x), (_, y) in zip(seen["dynamic"], seen["static"]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert 0 < b.time_prefill < b.time_forward <= b.time_total


def test_static_options_fail_early(pair):
    draft, target = pair
    ids, mask = ragged_prompts([2, 4])
    with pytest.raises(ConfigError, match="'paged'.*dynamic, static"):
        SpeculativeDecoder(draft, target, kv="paged")
    with pytest.raises(ConfigError, match="compile=True needs kv='static'"):
        SpeculativeDecoder(draft, target, compile=True)
    with pytest.raises(ConfigError, match="compile=True needs the models on a CUDA device.*cpu.*compile=False"):
        SpeculativeDecoder(draft, target, kv="static", compile=True)
    with pytest.raises(ConfigError, match="compile='yes'"):
        SpeculativeDecoder(draft, target, kv="static", compile="yes")
    with pytest.raises(ConfigError, match="'paged'"):
        autoregressive_generate(target, ids, mask, 4, kv="paged")
    with pytest.raises(ConfigError, match="CUDA device"):
        autoregressive_generate(target, ids, mask, 4, kv="static", compile=True)
    long = torch.ones(1, 4050, dtype=torch.long)
    with pytest.raises(ConfigError, match="exceeds the context"):
        SpeculativeDecoder(draft, target, gamma=3, kv="static").generate(long, torch.ones_like(long), 100)
    with pytest.raises(ConfigError, match="exceeds the context"):
        autoregressive_generate(target, long, torch.ones_like(long), 100, kv="static")
    flash = tiny_llama(104, 1)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="'flash_attention_2'.*'sdpa' or 'eager'"):
        SpeculativeDecoder(flash, flash, kv="static", temperature=0).generate(ids, mask, 4)
    chunked = tiny_llama(104, 1)
    chunked.config.layer_types = ["chunked_attention"]
    for kv in ("static", "dynamic"):
        with pytest.raises(ConfigError, match="cannot be decoded by the SD engine.*chunked_attention"):
            autoregressive_generate(chunked, ids, mask, 4, kv=kv)


def test_eager_attention_gets_an_additive_mask(one_thread):
    target = tiny_llama(104, 2, seed=1)
    target.config._attn_implementation = "eager"
    ids, mask = ragged_prompts(LENGTHS, seed=6)
    a, b = (autoregressive_generate(target, ids, mask, 12, temperature=0, pad_token_id=0, kv=kv)
            for kv in ("dynamic", "static"))
    assert _rows(a) == _rows(b)


def test_compile_path_traces_in_one_graph_per_width(pair, monkeypatch):
    """compile=True on CPU through dynamo's eager backend (no inductor, no CUDA graphs): fullgraph tracing of the
    fixed-shape step works, equals the dynamic path, and a new decoder of the same shapes compiles nothing new."""
    from torch._dynamo.utils import counters

    draft, target = pair
    monkeypatch.setattr(static_cache, "COMPILE_OPTIONS", {"backend": "eager", "dynamic": False, "fullgraph": True})
    ids, mask = ragged_prompts(LENGTHS, seed=7)
    kw = dict(gamma=4, temperature=1.0, eos_token_id=1, pad_token_id=0)
    ref = SpeculativeDecoder(draft, target, **kw).generate(ids, mask, 24, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    counters.clear()
    for round_ in range(2):
        dec = SpeculativeDecoder(draft, target, kv="static", compile=True, **kw)
        res = dec.generate(ids, mask, 24, generator=torch.Generator().manual_seed(3))
        _assert_same(ref, res)
        if round_ == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 3  # draft widths 1 and 2, verify width gamma + 1
    assert counters["stats"]["unique_graphs"] == graphs
    ar = autoregressive_generate(target, ids, mask, 12, temperature=0, pad_token_id=0, kv="static", compile=True)
    assert _rows(ar) == _rows(autoregressive_generate(target, ids, mask, 12, temperature=0, pad_token_id=0))
    torch._dynamo.reset()


def test_forward_timer_resolves_cuda_events_once(monkeypatch):
    """On CUDA the timer records event pairs and waits once, on the last event, when read."""
    waits = []

    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            FakeEvent.clock += 1.5
            self.t = FakeEvent.clock

        def elapsed_time(self, end):  # milliseconds
            return (end.t - self.t) * 1e3

        def synchronize(self):
            waits.append(self.t)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = ForwardTimer(torch.device("cuda"))
    for _ in range(3):
        timer.start()
        timer.stop()
    assert waits == [] and timer.calls == 3
    assert timer.seconds == pytest.approx(4.5) and waits == [9.0]
    assert timer.seconds == pytest.approx(4.5) and len(waits) == 1
