"""distillspec.losses.sparse: the top-k + tail teacher loss against the dense one."""

from __future__ import annotations

import pytest
import torch

from distillspec.losses.divergences import DIVERGENCES, divergence_loss
from distillspec.losses.sparse import sparse_divergence_loss, student_buckets, teacher_buckets

pytestmark = pytest.mark.usefixtures("one_thread")


def case(b=2, t=6, v=17, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    te = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    w = torch.rand(b, t, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(te / temperature, -1)
    return s, te, logp, mask, w


def sparse(s, logp, mask, name, k, **kw):
    vals, idx = logp.topk(k, -1)
    return sparse_divergence_loss(s, idx, vals, mask, name, **kw)


@pytest.mark.parametrize("name", [d for d in DIVERGENCES if d != "adaptive"])  # adaptive: dense teacher only
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_k_equal_vocab_is_the_dense_loss(name, temperature):
    """Value and gradient equal the dense divergence when the teacher keeps every token (k = V)."""
    s, te, logp, mask, w = case(temperature=temperature)
    dense, dense_tok = divergence_loss(s, te, mask, name, weights=w, temperature=temperature, chunk_size=None)
    (g_dense,) = torch.autograd.grad(dense, s)
    sp, sp_tok = sparse(s, logp, mask, name, s.shape[-1], weights=w, temperature=temperature, chunk_size=None)
    (g_sparse,) = torch.autograd.grad(sp, s)
    torch.testing.assert_close(sp, dense)
    torch.testing.assert_close(sp_tok, dense_tok.detach())
    torch.testing.assert_close(g_sparse, g_dense)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_small_k_is_a_lower_bound_that_tightens(name):
    """Data processing: coarse-graining never raises an f-divergence; more buckets never lower it."""
    s, te, logp, mask, _ = case(v=40, seed=1)
    dense, _ = divergence_loss(s, te, mask, name, chunk_size=None)
    vals = [float(sparse(s, logp, mask, name, k, chunk_size=None)[0].detach()) for k in (1, 4, 16, 40)]
    assert all(v <= float(dense) + 1e-9 for v in vals)
    assert vals == sorted(vals)
    assert vals[-1] == pytest.approx(float(dense))


def test_buckets_are_distributions_and_tail_is_exact():
    s, _, logp, _, _ = case(b=1, t=3, v=50)
    vals, idx = logp.topk(5, -1)
    sb, tb = student_buckets(s.detach(), idx), teacher_buckets(vals)
    torch.testing.assert_close(sb.exp().sum(-1), torch.ones(1, 3, dtype=torch.float64))
    torch.testing.assert_close(tb.exp().sum(-1), torch.ones(1, 3, dtype=torch.float64))
    q = torch.softmax(s.detach(), -1)
    tail = q.sum(-1) - q.gather(-1, idx).sum(-1)
    torch.testing.assert_close(sb[..., -1].exp(), tail)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_chunked_equals_plain(name):
    s, _, logp, mask, w = case(b=3, t=9, v=31, seed=2)
    a, a_tok = sparse(s, logp, mask, name, 8, weights=w, chunk_size=None)
    (ga,) = torch.autograd.grad(a, s)
    b, b_tok = sparse(s, logp, mask, name, 8, weights=w, chunk_size=3)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a_tok, b_tok)
    torch.testing.assert_close(ga, gb)


def test_gradient_matches_finite_differences():
    s, _, logp, mask, _ = case(b=1, t=2, v=7, seed=3)
    vals, idx = logp.topk(3, -1)
    m = torch.ones(1, 2, dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x: sparse_divergence_loss(x, idx, vals, m, "jsd", chunk_size=None)[0], (s,))
