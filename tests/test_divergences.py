"""distillspec.losses.divergences: definitions, closed forms, identities, numerics, chunked == unchunked."""

from __future__ import annotations

import math

import pytest
import torch

from distillspec.errors import ConfigError
from distillspec.losses.divergences import DIVERGENCES, LOG_ZERO, divergence_loss, entropy, overlap

NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_thread")



def div(student, teacher, name, **kw):
    """Loss over every position (mask all True) -> Python float."""
    mask = torch.ones(student.shape[:-1], dtype=torch.bool)
    loss, _ = divergence_loss(student, teacher, mask, name, **kw)
    return loss.item()


def bern(p: float) -> torch.Tensor:
    """(1, 1, 2) logits of the two-token distribution (p, 1 - p)."""
    return torch.tensor([[[math.log(p), math.log(1 - p)]]], dtype=torch.float64)


def kl2(a: float, b: float) -> float:
    """KL(Bern(a) || Bern(b)) by hand."""
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def random_case(b=2, t=5, v=13, seed=0, dtype=torch.float32):
    """Student/teacher logits with shared -inf tokens, teacher-only -inf tokens, a partial mask, weights."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g) * 2
    te = torch.randn(b, t, v, generator=g) * 2
    s[..., 0] = NEG_INF  # both models mask token 0
    te[..., 0] = NEG_INF
    te[0, 1, 3] = NEG_INF  # only the teacher masks one entry
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 1] = True
    weights = torch.rand(b, t, generator=g) + 0.1
    return s.to(dtype), te.to(dtype), mask, weights


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_iff_equal(name):
    x = torch.randn(2, 3, 11)
    y = torch.randn(2, 3, 11)
    assert abs(div(x, x.clone(), name)) < 1e-6
    _, per_tok = divergence_loss(x, y, torch.ones(2, 3, dtype=torch.bool), name)
    assert (per_tok > 1e-4).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_non_negative_random(name):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        scale = 0.1 + seed
        s, t = torch.randn(2, 8, 17, generator=g) * scale, torch.randn(2, 8, 17, generator=g) * scale
        _, per_tok = divergence_loss(s, t, torch.ones(2, 8, dtype=torch.bool), name)
        assert (per_tok >= -1e-6).all()


def test_closed_form_bernoulli():
    p, q = 0.8, 0.3  # teacher P = Bern(p), student Q = Bern(q)
    t, s = bern(p), bern(q)
    assert div(s, t, "fkl") == pytest.approx(0.8 * math.log(0.8 / 0.3) + 0.2 * math.log(0.2 / 0.7), rel=1e-6)
    assert div(s, t, "rkl") == pytest.approx(0.3 * math.log(0.3 / 0.8) + 0.7 * math.log(0.7 / 0.2), rel=1e-6)
    assert div(s, t, "tvd") == pytest.approx(0.5, rel=1e-6)
    for beta in (0.5, 0.3):
        m = beta * p + (1 - beta) * q
        want = beta * kl2(p, m) + (1 - beta) * kl2(q, m)
        assert div(s, t, "jsd", beta=beta) == pytest.approx(want, rel=1e-6)
    alpha = 0.1
    assert div(s, t, "skl", alpha=alpha) == pytest.approx(kl2(p, alpha * p + (1 - alpha) * q), rel=1e-6)
    assert div(s, t, "srkl", alpha=alpha) == pytest.approx(kl2(q, alpha * q + (1 - alpha) * p), rel=1e-6)


def test_jsd_over_beta_tends_to_fkl():
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    beta = 1e-4
    assert div(s, t, "jsd", beta=beta) / beta == pytest.approx(div(s, t, "fkl"), rel=1e-2)


def test_jsd_symmetry_identity():
    a, b = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    for beta in (0.2, 0.5, 0.9):
        assert div(a, b, "jsd", beta=beta) == pytest.approx(div(b, a, "jsd", beta=1 - beta), rel=1e-5)


def test_skew_at_alpha_zero_is_kl():
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    assert div(s, t, "skl", alpha=0.0) == pytest.approx(div(s, t, "fkl"), rel=1e-6)
    assert div(s, t, "srkl", alpha=0.0) == pytest.approx(div(s, t, "rkl"), rel=1e-6)
    assert div(s, t, "skl", alpha=0.5) < div(s, t, "fkl")  # skewing towards P shrinks the divergence


@pytest.mark.parametrize("name", DIVERGENCES)
def test_temperature_is_logit_scaling(name):
    s, t = torch.randn(2, 4, 9) * 3, torch.randn(2, 4, 9) * 3
    assert div(s, t, name, temperature=2.0) == pytest.approx(div(s / 2, t / 2, name), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_float64(name, chunk_size):
    s, t, mask, w = random_case(b=2, t=3, v=5, seed=1, dtype=torch.float64)
    s = torch.randn_like(s).requires_grad_(True)  # finite student; teacher keeps its -inf entries
    w = w.double()

    def fn(x):
        return divergence_loss(x, t, mask, name, weights=w, beta=0.3, alpha=0.2, chunk_size=chunk_size,
                               temperature=1.5)[0]

    assert fn(s).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_equals_unchunked(name):
    s0, t, mask, w = random_case()
    ref = None
    for chunk_size in (None, 1, 3, 100):
        s = s0.clone().requires_grad_(True)
        loss, per_tok = divergence_loss(s, t, mask, name, weights=w, chunk_size=chunk_size, beta=0.3, alpha=0.2)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(per_tok).all()
        if ref is None:
            ref = (loss.detach(), per_tok.detach(), s.grad)
            continue
        torch.testing.assert_close(loss.detach(), ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(per_tok.detach(), ref[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.grad, ref[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_inputs_finite(name):
    s0, t, mask, w = random_case(dtype=torch.bfloat16)
    grads = []
    for chunk_size in (None, 4):
        s = s0.clone().requires_grad_(True)
        loss, per_tok = divergence_loss(s, t, mask, name, weights=w, chunk_size=chunk_size)
        loss.backward()
        assert loss.dtype == torch.float32 and per_tok.dtype == torch.float32
        assert torch.isfinite(loss) and torch.isfinite(s.grad.float()).all() and s.grad.dtype == torch.bfloat16
        grads.append(s.grad.float())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_shared_neg_inf_equals_reduced_vocab(name):
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., 2:4] = NEG_INF
    t_inf[..., 2:4] = NEG_INF
    keep = [0, 1, 4, 5, 6, 7, 8]
    assert div(s_inf, t_inf, name) == pytest.approx(div(s[..., keep], t[..., keep], name), rel=1e-5)


def test_teacher_only_neg_inf_finite():
    s = torch.zeros(1, 1, 4)  # uniform student
    t = torch.tensor([[[0.0, 0.0, 0.0, NEG_INF]]])
    assert div(s, t, "fkl") == pytest.approx(math.log(4 / 3), rel=1e-5)
    # rkl is +inf in exact arithmetic; the zero teacher probability is treated as exp(LOG_ZERO).
    want = 0.75 * math.log(0.25 / (1 / 3)) + 0.25 * (math.log(0.25) - LOG_ZERO)
    assert div(s, t, "rkl") == pytest.approx(want, rel=1e-5)
    for name in DIVERGENCES:
        x = s.clone().requires_grad_(True)
        loss, _ = divergence_loss(x, t, torch.ones(1, 1, dtype=torch.bool), name)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_mask_excludes_positions(chunk_size):
    s0, t0, mask, w = random_case()
    s1, t1 = s0.clone(), t0.clone()
    s1[~mask] = float("nan")  # never read, not even for the gradient
    t1[~mask] = 1e4
    for name in DIVERGENCES:
        out = []
        for s, t in ((s0, t0), (s1, t1)):
            x = s.clone().requires_grad_(True)
            loss, per_tok = divergence_loss(x, t, mask, name, weights=w, chunk_size=chunk_size)
            loss.backward()
            assert (per_tok[~mask] == 0).all() and (x.grad[~mask] == 0).all()
            out.append((loss.detach(), x.grad[mask]))
        torch.testing.assert_close(out[0][0], out[1][0])
        torch.testing.assert_close(out[0][1], out[1][1])


def test_normalizer_semantics():
    s, t, mask, w = random_case()
    loss, per_tok = divergence_loss(s, t, mask, "fkl")
    assert loss.item() == pytest.approx(per_tok[mask].sum().item() / mask.sum().item(), rel=1e-6)
    loss, per_tok = divergence_loss(s, t, mask, "fkl", weights=w, normalizer=10.0)
    assert loss.item() == pytest.approx((w * per_tok)[mask].sum().item() / 10.0, rel=1e-6)
    loss_t, _ = divergence_loss(s, t, mask, "fkl", weights=w, normalizer=torch.tensor(10.0), chunk_size=3)
    assert loss_t.item() == pytest.approx(loss.item(), rel=1e-6)
    # Empty mask: normalizer clamps to 1, loss is 0 and still backward-able.
    for chunk_size in (None, 2):
        x = s.clone().requires_grad_(True)
        loss, per_tok = divergence_loss(x, t, torch.zeros_like(mask), "rkl", chunk_size=chunk_size)
        loss.backward()
        assert loss.item() == 0.0 and (per_tok == 0).all() and (x.grad == 0).all()


def test_teacher_gets_no_gradient():
    s, t, mask, _ = random_case()
    s.requires_grad_(True)
    t = torch.randn_like(t).requires_grad_(True)
    for chunk_size in (None, 2):
        loss, _ = divergence_loss(s, t, mask, "jsd", chunk_size=chunk_size)
        loss.backward()
        assert t.grad is None and s.grad is not None


def test_errors():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ConfigError) as e:
        divergence_loss(s, t, mask, "kl_typo")
    assert "kl_typo" in str(e.value) and "fkl" in str(e.value)
    with pytest.raises(ValueError) as e:
        divergence_loss(s, torch.randn(2, 3, 6), mask, "fkl")
    assert "(2, 3, 5)" in str(e.value) and "(2, 3, 6)" in str(e.value)
    with pytest.raises(ValueError):
        divergence_loss(s, t, torch.ones(2, 4, dtype=torch.bool), "fkl")


def test_the_objective_spec_refuses_what_the_loss_cannot_compute():
    """The settings' ranges are checked once, by ObjectiveSpec (the loss below checks names and shapes only)."""
    from distillspec.defaults import build_spec
    from distillspec.specs import ObjectiveSpec

    for kw, name in (({"divergence": "jsd", "beta": 0.0}, "div.beta"), ({"divergence": "jsd", "beta": 1.0}, "div.beta"),
                     ({"divergence": "skl", "alpha": 1.0}, "div.alpha"), ({"temperature": 0.0}, "div.temperature"),
                     ({"chunk_size": 0}, "div.chunk_size"), ({"block_weighting": "blocks"}, "div.block_weighting")):
        with pytest.raises(ConfigError, match=name):
            build_spec(ObjectiveSpec, **kw)


def test_entropy_and_overlap():
    for v in (2, 7, 100):
        assert entropy(torch.zeros(3, v)).tolist() == pytest.approx([math.log(v)] * 3, rel=1e-6)
    h = entropy(torch.tensor([[0.0, 0.0, NEG_INF, NEG_INF]], dtype=torch.bfloat16))
    assert h.dtype == torch.float32 and h.item() == pytest.approx(math.log(2), rel=1e-6)
    assert entropy(torch.tensor([5.0, NEG_INF, NEG_INF])).item() == 0.0
    x, y = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    assert torch.allclose(overlap(x, x.clone()), torch.ones(2, 3))
    _, tv = divergence_loss(y, x, torch.ones(2, 3, dtype=torch.bool), "tvd")
    torch.testing.assert_close(overlap(x, y), 1 - tv, atol=1e-6, rtol=1e-6)
    assert overlap(torch.tensor([0.0, NEG_INF]), torch.tensor([NEG_INF, 0.0])).item() == 0.0


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_saves_no_float32_vocab_tensors(name):
    """The chunked path keeps no float32 (rows, V) intermediates for backward; the unchunked path does."""
    s, t, mask, w = random_case(dtype=torch.bfloat16)
    s.requires_grad_(True)
    vocab = s.shape[-1]

    def saved_f32_vocab(chunk_size):
        saved = []

        def pack(x):
            if x.dtype == torch.float32 and x.dim() >= 2 and x.shape[-1] == vocab:
                saved.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            divergence_loss(s, t, mask, name, weights=w, chunk_size=chunk_size)
        return sum(saved)

    assert saved_f32_vocab(None) > 0
    assert saved_f32_vocab(4) == 0
