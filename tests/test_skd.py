"""SKD rollouts: the student proposes every token and the teacher only replaces
proposals outside its top-K; no teacher token after a fully accepted block; at T = 0 both are greedy."""

from __future__ import annotations

import torch
from scipy import stats

from distillspec.sd.engine import SpeculativeDecoder
from benchmarks.sd_nocache import generate_nocache
from tests.sd_stubs import BigramLM, exact_sequence_probs, log_table

V = 4


def _tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) random bigram probability tables (V, V) whose argmaxes differ."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(2 * torch.randn(V, V, generator=g), -1)
    p = q.roll(1, dims=1).sqrt()  # every teacher argmax is one token after the student's
    p = p / p.sum(-1, keepdim=True)
    return q, p


def _skd(q, p, top_k, temperature, n_rows, length, gamma=2, seed=0):
    dec = SpeculativeDecoder(BigramLM(log_table(q)), BigramLM(log_table(p)), gamma=gamma, temperature=temperature,
                             acceptance="topk", top_k=top_k, eos_token_id=None)
    ids = torch.zeros(n_rows, 1, dtype=torch.long)
    return dec, dec.generate(ids, torch.ones_like(ids), length, generator=torch.Generator().manual_seed(seed))


def test_skd_with_k_equal_vocab_is_exactly_the_student_sample():
    """K = V: every proposal is kept, so sequences follow the student's own distribution (chi-square on all
    V**3 continuations; gamma = 2, so token 3 is the one the old bonus rule drew from the teacher)."""
    q, p = _tables()
    n = 20_000
    _, res = _skd(q, p, V, 1.0, n, 3)
    assert bool((res.lengths == 3).all())
    assert bool((res.trace_accepted.all()))
    probs = exact_sequence_probs(BigramLM(log_table(q)), torch.zeros(1, dtype=torch.long), 3, 1.0, 1.0)
    counts = {s: 0 for s in probs}
    for row in res.tokens.tolist():
        counts[tuple(row)] += 1
    keys = [s for s in probs if probs[s] * n >= 5]
    obs = [counts[s] for s in keys] + [n - sum(counts[s] for s in keys)]
    exp = [probs[s] * n for s in keys] + [n - sum(probs[s] * n for s in keys)]
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_skd_near_deterministic_student_is_followed():
    """A student that almost surely walks 0 -> 1 -> 2 -> 3 -> 0 ..., K = V: the rollout is that walk."""
    q = torch.full((V, V), 1e-6)
    q[torch.arange(V), (torch.arange(V) + 1) % V] = 1.0
    q = q / q.sum(-1, keepdim=True)
    _, p = _tables()
    _, res = _skd(q, p, V, 1.0, 64, 9, gamma=3)
    walk = torch.tensor([(i + 1) % V for i in range(9)])
    assert bool((res.tokens == walk).all()), res.tokens[:4]


def test_skd_greedy_keeps_the_topk_rule():
    """T = 0: K = V gives the student's greedy sequence, K = 1 the teacher's (not teacher greedy for any K)."""
    q, p = _tables()

    def greedy_walk(table, length):
        out, tok = [], 0
        for _ in range(length):
            tok = int(table[tok].argmax())
            out.append(tok)
        return torch.tensor(out)

    for k, table in ((V, q), (1, p)):
        dec, res = _skd(q, p, k, 0.0, 3, 7)
        assert dec.rule == "topk"
        assert bool((res.tokens == greedy_walk(table, 7)).all()), (k, res.tokens)


def test_skd_engine_matches_nocache_reference():
    q, p = _tables(1)
    dec, res = _skd(q, p, 2, 1.0, 16, 11, gamma=3, seed=4)
    ref = generate_nocache(dec, torch.zeros(16, 1, dtype=torch.long), torch.ones(16, 1, dtype=torch.long), 11,
                           generator=torch.Generator().manual_seed(4))
    assert torch.equal(res.tokens, ref.tokens) and torch.equal(res.lengths, ref.lengths)


def test_skd_rollout_source_with_k_equal_vocab(tiny_pair_dirs):
    """Through RolloutSampler on the tiny pair at T = 0: K = V reproduces the student's greedy rollout."""
    from transformers import AutoModelForCausalLM

    from distillspec.rollout.sources import RolloutSampler
    from distillspec.specs import RolloutSpec
    from distillspec.defaults import build_spec

    draft_dir, target_dir = tiny_pair_dirs
    student = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    vocab = student.config.vocab_size
    ids = torch.randint(3, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    skd = RolloutSampler(build_spec(RolloutSpec, source="skd", temperature=0.0, skd_top_k=vocab, skd_gamma=3),
                         student, teacher, eos_ids=[], pad_id=0, max_new_tokens=10)
    own = RolloutSampler(build_spec(RolloutSpec, source="student", temperature=0.0), student, teacher,
                         eos_ids=[], pad_id=0, max_new_tokens=10)
    a = skd.sample(ids, mask, [None, None], torch.Generator().manual_seed(1))
    b = own.sample(ids, mask, [None, None], torch.Generator().manual_seed(1))
    assert torch.equal(a.input_ids, b.input_ids)
