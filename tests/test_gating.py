"""distillspec.losses.gating.speckd_gate: greedy / sampled / ratio SpecKD gating."""

from __future__ import annotations

import pytest
import torch

from distillspec.errors import ConfigError
from distillspec.losses.gating import GateResult, speckd_gate

V = 6


pytestmark = pytest.mark.usefixtures("one_thread")


# Teacher: the same ranking at both positions, top-2 = {0, 1}.
TEACHER = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 2])  # (1, 2, V)


def student_with_argmax(*tokens: int) -> torch.Tensor:
    """(1, len(tokens), V) logits whose argmax at position i is tokens[i]."""
    s = torch.zeros(1, len(tokens), V)
    for i, tok in enumerate(tokens):
        s[0, i, tok] = 3.0
    return s


def test_greedy_accept_and_reject():
    out = speckd_gate(student_with_argmax(1, 4), TEACHER, top_k=2, beta=0.05)
    assert isinstance(out, GateResult)
    assert out.accepted.tolist() == [[True, False]]
    assert out.weights.dtype == torch.float32 and out.accepted.dtype == torch.bool
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 0.05]]))
    # A larger k admits the rejected token; k > V accepts everything.
    assert speckd_gate(student_with_argmax(1, 4), TEACHER, top_k=5).accepted.all()
    assert speckd_gate(student_with_argmax(5, 4), TEACHER, top_k=100).accepted.all()
    # beta = 0 drops rejected tokens entirely.
    assert speckd_gate(student_with_argmax(1, 4), TEACHER, top_k=2, beta=0.0).weights.tolist() == [[1.0, 0.0]]


def test_greedy_dtypes_and_detached():
    s = student_with_argmax(0, 3).to(torch.bfloat16).requires_grad_(True)
    out = speckd_gate(s, TEACHER.to(torch.bfloat16), top_k=3)
    assert out.accepted.tolist() == [[True, False]]
    assert not out.weights.requires_grad
    assert out.weights.shape == (1, 2) and out.accepted.shape == (1, 2)


def test_top_k_ties_inclusive():
    t = torch.tensor([[[2.0, 1.0, 1.0, 0.0]]])
    for tok in (1, 2):  # both tied second-best tokens count as in the top-2
        s = torch.zeros(1, 1, 4)
        s[0, 0, tok] = 1.0
        assert speckd_gate(s, t, top_k=2).accepted.item()


def test_sampled_reproducible_and_more_candidates_accept_more():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 256, 50, generator=g), torch.randn(4, 256, 50, generator=g)

    def run(n, seed):
        return speckd_gate(s, t, top_k=3, mode="sampled", num_candidates=n,
                           generator=torch.Generator().manual_seed(seed))

    a, b = run(1, 7), run(1, 7)
    assert torch.equal(a.accepted, b.accepted) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.accepted, run(1, 8).accepted)
    rates = [run(n, 7).accepted.float().mean().item() for n in (1, 4, 16)]
    assert rates[0] < rates[1] < rates[2]
    assert 0.03 < rates[0] < 0.15  # about top_k / V = 0.06 for unrelated random logits


def test_sampled_peaked_student_matches_greedy():
    s = student_with_argmax(1, 4) * 100  # essentially deterministic sampling
    out = speckd_gate(s, TEACHER, top_k=2, mode="sampled", num_candidates=3,
                      generator=torch.Generator().manual_seed(0), beta=0.2)
    assert out.accepted.tolist() == [[True, False]]
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 0.2]]))


def test_ratio_weights_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 8, generator=g) * 2, torch.randn(3, 5, 8, generator=g) * 2
    beta = 0.05
    out = speckd_gate(s, t, mode="ratio", beta=beta)
    x = s.argmax(-1, keepdim=True)
    p = torch.softmax(t, -1).gather(-1, x).squeeze(-1)
    q = torch.softmax(s, -1).gather(-1, x).squeeze(-1)
    want = (p / q).clamp(max=1.0).clamp(min=beta)
    torch.testing.assert_close(out.weights, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.accepted, p >= q)
    assert out.accepted.any() and (~out.accepted).any()
    # Teacher gives the student's token zero probability: the weight is the floor.
    t0 = torch.zeros(1, 1, 4)
    t0[..., 2] = float("-inf")
    s0 = torch.tensor([[[0.0, 0.0, 5.0, 0.0]]])
    out = speckd_gate(s0, t0, mode="ratio", beta=beta)
    assert not out.accepted.item() and out.weights.item() == pytest.approx(beta)


def test_errors():
    s, t = torch.randn(1, 2, V), torch.randn(1, 2, V)
    with pytest.raises(ConfigError) as e:
        speckd_gate(s, t, mode="topk")
    msg = str(e.value)
    assert "topk" in msg and all(m in msg for m in ("greedy", "sampled", "ratio"))
    with pytest.raises(ConfigError):
        speckd_gate(s, t, top_k=0)
    with pytest.raises(ConfigError):
        speckd_gate(s, t, mode="sampled", num_candidates=0)
    with pytest.raises(ConfigError):
        speckd_gate(s, t, beta=1.5)
    with pytest.raises(ValueError):
        speckd_gate(s, torch.randn(1, 2, V + 1))


def test_speckd_defaults_follow_the_paper():
    """SpecKD Algorithm 1: "k = 5 and beta = 0.01 unless otherwise specified" (config and function)."""
    import inspect

    from conftest import compose_cfg

    from distillspec.runner import build

    spec = build(compose_cfg(["div=speckd"]).div, "div")
    assert (spec.gate.top_k, spec.gate.beta) == (5, 0.01)
    params = inspect.signature(speckd_gate).parameters
    assert (params["top_k"].default, params["beta"].default) == (5, 0.01)
