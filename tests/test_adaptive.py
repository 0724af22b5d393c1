"""Entropy-adaptive distillation (div=adaptive) and block-aware reach weights: definitions against references,
endpoints, float64 gradients, chunked == plain, detached entropy and weights, schedules, specs, training stats."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.losses.adaptive import (BetaSchedule, entropy_bin_metrics, entropy_bin_sums, reach_weights,
                                         train_entropy_edges)
from distillspec.losses.divergences import divergence_loss, entropy, overlap

pytestmark = pytest.mark.usefixtures("one_thread")


def case(b=2, t=6, v=11, seed=0, dtype=torch.float32, scale=2.0):
    """Student/teacher logits (a shared -inf token, a teacher-only -inf), a partial mask, positive weights."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    te = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    te[0, :2] *= 4  # some confident teacher rows, so a logistic schedule spans a range of betas
    s[..., 0] = te[..., 0] = float("-inf")
    te[1, 2, 4] = float("-inf")
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, :3] = True
    w = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.1
    return s.to(dtype), te.to(dtype), mask, w.to(dtype)


def loss_and_grad(s0, t, mask, name, **kw):
    s = s0.clone().requires_grad_(True)
    loss, per_tok = divergence_loss(s, t, mask, name, **kw)
    loss.backward()
    return loss.detach(), per_tok.detach(), s.grad


def const(beta, form="njsd"):
    return BetaSchedule(beta_confident=beta, beta_uncertain=beta, form=form)


def ref_adaptive(s, t, mask, betas, form="njsd", weights=None):
    """Float64 textbook reference: naive log M, per-row beta given; (B, T) betas."""
    lp, lq = torch.log_softmax(t.double(), -1).clamp(min=-1000), torch.log_softmax(s.double(), -1).clamp(min=-1000)
    kl = lambda la, lb: (la.exp() * (la - lb)).sum(-1)  # noqa: E731
    b = betas.double()
    lm = torch.logaddexp(lp + b.unsqueeze(-1).log(), lq + torch.log1p(-b).unsqueeze(-1))
    jsd = b * kl(lp, lm) + (1 - b) * kl(lq, lm)
    per = {"jsd": jsd, "njsd": jsd / (b * (1 - b)), "mix": (1 - b) * kl(lp, lq) + b * kl(lq, lp)}[form]
    w = mask.double() * (1.0 if weights is None else weights.double())
    return (per * w).sum() / mask.sum()


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("beta", [0.3, 0.5, 0.8])
def test_constant_schedule_reproduces_jsd(beta, chunk_size):
    s, t, mask, w = case()
    ref = loss_and_grad(s, t, mask, "jsd", beta=beta, weights=w, chunk_size=chunk_size)
    got = loss_and_grad(s, t, mask, "adaptive", schedule=const(beta, "jsd"), weights=w, chunk_size=chunk_size)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the normalised form is jsd / (beta (1 - beta)), value and gradient
    nj = loss_and_grad(s, t, mask, "adaptive", schedule=const(beta), weights=w, chunk_size=chunk_size)
    scale = beta * (1 - beta)
    for a, b in zip(nj, ref):
        torch.testing.assert_close(a * scale, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("form", ["njsd", "mix"])
def test_endpoints_are_fkl_and_rkl(form, chunk_size):
    s, t, mask, w = case(seed=1)
    for beta, name in ((0.0, "fkl"), (1.0, "rkl")):
        ref = loss_and_grad(s, t, mask, name, weights=w, chunk_size=chunk_size)
        got = loss_and_grad(s, t, mask, "adaptive", schedule=const(beta, form), weights=w, chunk_size=chunk_size)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_njsd_is_continuous_at_the_endpoints_in_float32():
    """njsd(beta) -> fkl / rkl as beta -> 0 / 1, and stays accurate in float32 near them (a naive log M - log Q
    would lose ~eps |log Q| / beta)."""
    # moderate logits, no teacher-only zeros: near such tokens (p << (1-beta) q) njsd converges to rkl only
    # slowly (like log 1/(1-beta) where the true rkl is infinite)
    s, t, mask, _ = case(seed=2, scale=1.0)
    t[0, :2] /= 4
    t[1, 2, 4] = 0.0
    fkl = divergence_loss(s, t, mask, "fkl")[0].item()
    rkl = divergence_loss(s, t, mask, "rkl")[0].item()
    for beta in (1e-5, 1e-4, 1e-3):
        lo = divergence_loss(s, t, mask, "adaptive", schedule=const(beta))[0]
        hi = divergence_loss(s, t, mask, "adaptive", schedule=const(1 - beta))[0]
        # the reference gets the same float32-rounded beta (near a teacher-masked token the value moves by
        # ~q / (1 - beta) per unit of beta, so beta's own rounding would show)
        lo64 = ref_adaptive(s, t, mask, torch.full(mask.shape, beta).double()).item()
        hi64 = ref_adaptive(s, t, mask, torch.full(mask.shape, 1 - beta).double()).item()
        assert lo.item() == pytest.approx(lo64, rel=2e-6)
        assert hi.item() == pytest.approx(hi64, rel=2e-6)
        assert abs(lo.item() - fkl) < 50 * beta * fkl and abs(hi.item() - rkl) < 50 * beta * rkl


@pytest.mark.parametrize("form", ["njsd", "jsd", "mix"])
def test_per_token_beta_matches_float64_reference(form):
    """float32 loss and gradient with beta_t from the entropy schedule == a float64 textbook reference."""
    s, t, mask, w = case(seed=3)
    sched = BetaSchedule(beta_confident=0.9, beta_uncertain=0.2, center=1.0, width=0.7, form=form)
    s64 = s.double().requires_grad_(True)
    h = entropy(t.double())
    betas = 0.9 + (0.2 - 0.9) * torch.sigmoid((h.log() - math.log(1.0)) / 0.7)
    assert betas[mask].max() - betas[mask].min() > 0.3  # the test really varies beta
    ref = ref_adaptive(s64, t, mask, betas, form, w)
    (g_ref,) = torch.autograd.grad(ref, s64)
    aux: dict = {}
    loss, _, grad = loss_and_grad(s, t, mask, "adaptive", schedule=sched, weights=w, chunk_size=4, aux=aux)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(aux["beta"][mask].double(), betas[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["entropy"][mask].double(), h[mask], rtol=1e-5, atol=1e-5)
    assert (aux["beta"][~mask] == 0).all()


@pytest.mark.parametrize("sched", [BetaSchedule(), BetaSchedule(kind="table", edges=[0.5, 2.0], values=[1, 0.4, 0]),
                                   BetaSchedule(beta_confident=0.0, beta_uncertain=1.0, form="mix")])
def test_gradcheck_float64(sched):
    """(Block weights depend on the student but are constants by definition, so gradcheck runs without them;
    test_entropy_and_weights_are_not_differentiated covers that gradient.)"""
    s, t, mask, w = case(b=2, t=4, v=5, seed=4, dtype=torch.float64)
    s = torch.randn_like(s).requires_grad_(True)
    for chunk in (None, 3):
        fn = lambda x: divergence_loss(x, t, mask, "adaptive", schedule=sched, weights=w, chunk_size=chunk,  # noqa
                                       temperature=1.3)[0]
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("block", ["none", "block", "block_avg"])
def test_chunked_equals_plain(block):
    s, t, mask, w = case(seed=5)
    sched = BetaSchedule(kind="table", edges=[0.3, 1.0, 2.0], values=[1.0, 0.7, 0.3, 0.0])
    ref = loss_and_grad(s, t, mask, "adaptive", schedule=sched, weights=w, block_weighting=block)
    for chunk in (1, 4, 100):
        got = loss_and_grad(s, t, mask, "adaptive", schedule=sched, weights=w, block_weighting=block,
                            chunk_size=chunk)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_entropy_and_weights_are_not_differentiated():
    """The teacher (hence its entropy and beta) and the reach weights are constants: with a teacher computed
    from the student in the same graph, the gradient is that of sum_t w_t D(beta_t) with w, beta, teacher fixed."""
    s0, _, mask, _ = case(seed=6)
    sched = BetaSchedule(beta_confident=1.0, beta_uncertain=0.0, center=1.5, width=0.5)
    s = s0.clone().requires_grad_(True)
    teacher = 1.7 * s + 0.3  # shares the graph with the student
    loss, _ = divergence_loss(s, teacher, mask, "adaptive", schedule=sched, block_weighting="block", block_gamma=3)
    (g,) = torch.autograd.grad(loss, s)
    t_const = teacher.detach()
    w = reach_weights(s0, t_const, mask, 3, "block")
    aux: dict = {}
    s2 = s0.clone().requires_grad_(True)
    ref, _ = divergence_loss(s2, t_const, mask, "adaptive", schedule=sched, weights=w, aux=aux)
    (g_ref,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert aux["beta"][mask].max() - aux["beta"][mask].min() > 0.4  # beta really varies per token
    x = s0.clone().requires_grad_(True)
    assert not reach_weights(x, t_const, mask, 3).requires_grad


def test_reach_weights_by_hand():
    """Two-token rows: a_t = min(p, q) + min(1 - p, 1 - q) = 1 - |p - q|."""
    p = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.6])
    q = torch.tensor([0.6, 0.5, 0.6, 0.1, 0.6])
    lg = lambda x: torch.stack([x.log(), (1 - x).log()], -1).unsqueeze(0)  # noqa: E731  (1, 5, 2)
    mask = torch.ones(1, 5, dtype=torch.bool)
    a = 1 - (p - q).abs()
    torch.testing.assert_close(overlap(lg(p), lg(q))[0], a)
    got = reach_weights(lg(q), lg(p), mask, gamma=2, mode="block")[0]
    torch.testing.assert_close(got, torch.stack([a.new_tensor(1.0), a[0], a.new_tensor(1.0), a[2], a.new_tensor(1.0)]))
    got = reach_weights(lg(q), lg(p), mask, gamma=3, mode="block")[0]
    torch.testing.assert_close(got, torch.stack([a.new_tensor(1.0), a[0], a[0] * a[1], a.new_tensor(1.0), a[3]]))
    avg = reach_weights(lg(q), lg(p), mask, gamma=3, mode="block_avg")[0]
    want = [1.0, (1 + 2 * a[0]) / 3, (1 + a[1] + a[0] * a[1]) / 3, (1 + a[2] + a[1] * a[2]) / 3,
            (1 + a[3] + a[2] * a[3]) / 3]
    torch.testing.assert_close(avg, torch.stack([torch.as_tensor(x) for x in want]).float())
    # a masked-out position does not block the ones after it
    m2 = mask.clone()
    m2[0, 0] = False
    assert reach_weights(lg(q), lg(p), m2, gamma=3)[0, 1] == 1.0
    # tvd under block weighting = sum_t w_t (1 - a_t) / N
    loss, _ = divergence_loss(lg(q), lg(p), mask, "tvd", block_weighting="block", block_gamma=3)
    w3 = reach_weights(lg(q), lg(p), mask, gamma=3)[0]
    assert loss.item() == pytest.approx(float((w3 * (1 - a)).sum() / 5), rel=1e-6)


def test_schedules():
    h = torch.tensor([1e-4, 0.1, 1.0, 10.0, 1e3])
    sched = BetaSchedule()
    b = sched(h)
    assert b[0] == pytest.approx(1.0, abs=1e-6) and b[-1] == pytest.approx(0.5, abs=1e-6)
    assert b[2] == pytest.approx(0.75) and (b[1:] <= b[:-1]).all()  # midpoint at the centre, monotone
    rev = BetaSchedule(reverse=True)(h)
    assert rev[0] == pytest.approx(0.5, abs=1e-6) and rev[-1] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(rev, 1.5 - b)
    table = BetaSchedule(kind="table", edges=[0.1, 10.0], values=[0.9, 0.5, 0.1])
    assert table(h).tolist() == pytest.approx([0.9, 0.5, 0.5, 0.1, 0.1])  # [e_{i-1}, e_i): an edge goes up
    assert BetaSchedule(kind="table", edges=[0.1, 10.0], values=[0.9, 0.5, 0.1], reverse=True)(h).tolist() \
        == pytest.approx([0.1, 0.5, 0.5, 0.9, 0.9])
    assert BetaSchedule(kind="table", values=[0.3])(h).tolist() == pytest.approx([0.3] * 5)
    assert (const(0.4)(h) == 0.4).all()


@pytest.mark.parametrize("kw, match", [
    (dict(kind="step"), "kind"), (dict(beta_confident=1.5), "beta_confident"), (dict(center=0.0), "center"),
    (dict(width=-1.0), "width"), (dict(form="kl"), "form"), (dict(kind="table", values=[0.5, 0.5]), "values"),
    (dict(kind="table", edges=[1.0, 0.5], values=[0, 0, 0]), "edges"),
    (dict(kind="table", edges=[1.0], values=[0, 2]), "values entry"),
])
def test_schedule_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        BetaSchedule(**kw)


def test_objective_spec():
    from distillspec.specs import ObjectiveSpec
    from distillspec.defaults import build_spec

    spec = build_spec(ObjectiveSpec, divergence="adaptive",
                      adaptive={"kind": "table", "edges": [1.0], "values": [1.0, 0.5]})
    assert isinstance(spec.adaptive, BetaSchedule) and spec.adaptive.values == (1.0, 0.5)
    assert isinstance(build_spec(ObjectiveSpec, divergence="adaptive").adaptive, BetaSchedule)
    with pytest.raises(ConfigError, match="div.adaptive is set but div.divergence='fkl'"):
        build_spec(ObjectiveSpec, divergence="fkl", adaptive={"center": 2.0})
    with pytest.raises(ConfigError, match="invalid div.adaptive settings"):
        build_spec(ObjectiveSpec, divergence="adaptive", adaptive={"centre": 2.0})
    with pytest.raises(ConfigError, match="block_weighting 'blocks'.*none, block, block_avg"):
        build_spec(ObjectiveSpec, block_weighting="blocks")
    with pytest.raises(ConfigError, match="block_gamma=0"):
        build_spec(ObjectiveSpec, block_gamma=0)


def test_entropy_bin_stats():
    edges = train_entropy_edges().tolist()  # [0, 1e-4, 1e-3, ..., 10, inf]
    ent = torch.tensor([[5e-5, 0.5, 0.7, 20.0]])
    div = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    beta = torch.tensor([[1.0, 0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    sums = entropy_bin_sums(div, ent, mask, beta) * 2  # two identical micro-batches add up
    m = entropy_bin_metrics(sums, with_beta=True)
    assert m[C.TRAIN_BETA_MEAN] == pytest.approx(2 / 3)
    lab = lambda i: f"{edges[i]:g}-{edges[i + 1]:g}"  # noqa: E731
    assert m[C.TRAIN_DIV_BY_ENTROPY + lab(0)] == 1.0 and m[C.TRAIN_TOKENS_BY_ENTROPY + lab(0)] == pytest.approx(1 / 3)
    assert m[C.TRAIN_DIV_BY_ENTROPY + "0.1-1"] == 3.0 and m[C.TRAIN_TOKENS_BY_ENTROPY + "0.1-1"] == pytest.approx(2 / 3)
    assert math.isnan(m[C.TRAIN_DIV_BY_ENTROPY + "10-inf"]) and m[C.TRAIN_TOKENS_BY_ENTROPY + "10-inf"] == 0.0
    assert C.TRAIN_BETA_MEAN not in entropy_bin_metrics(sums, with_beta=False)


def test_adaptive_trains_with_gate_block_weights_and_skd(tmp_path):
    """div=adaptive end to end on the tiny pair with SKD rollouts, the SpecKD gate and block weighting; the
    per-step stats reach the CSV log."""
    from conftest import TINY, run_cfg

    gate = "div.gate={top_k:5,mode:greedy,num_candidates:1,beta:0.1}"
    out = run_cfg(TINY + ["div=adaptive_reversed", "rollout=skd", gate, "div.block_weighting=block_avg",
                          "stage=train"], tmp_path)
    assert out["train"]["steps"] == 2
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    row = next(r for r in rows if r.get(C.TRAIN_BETA_MEAN))
    assert 0.5 <= float(row[C.TRAIN_BETA_MEAN]) <= 1.0
    assert 0.0 < float(row[C.TRAIN_BLOCK_WEIGHT_MEAN]) <= 1.0 and float(row[C.TRAIN_TAR]) >= 0.0
    shares = [float(v) for k, v in row.items() if k.startswith(C.TRAIN_TOKENS_BY_ENTROPY)]
    assert len(shares) == len(train_entropy_edges()) - 1 and sum(shares) == pytest.approx(1.0)


def test_report_labels_entropy_table_and_task_panels(tmp_path):
    """The experiment's report: adaptive variants get their own labels, acceptance per entropy bin per method
    lands in the right cell, and the entropy figure gets one panel per task."""
    import matplotlib.image
    import pandas as pd

    from distillspec.report import FIG_ENTROPY, entropy_table, method_label, plots

    div = {"divergence": "adaptive", "adaptive": {"reverse": True}, "block_weighting": "none"}
    assert method_label({"div": div, "rollout": {"source": "mixed"}}, "train_eval") == "adaptive-rev/mixed"
    div = {"divergence": "tvd", "block_weighting": "block"}
    assert method_label({"div": div, "rollout": {"source": "student"}}, "train_eval") == "tvd+block"
    bins = lambda a: [{"bin_lo": 0.1, "bin_hi": 0.316, "count": 10.0, "acceptance": a},  # noqa: E731
                      {"bin_lo": 1.0, "bin_hi": 3.16, "count": 7.0, "acceptance": a / 2}]
    rows = [("rkl", "A", 0.5), ("adaptive", "A", 0.25), ("rkl", "B", 0.75)]
    df = pd.DataFrame([{"method": m, "task": t, "rollout": "mixed", "gamma": 5, "temperature": 1.0,
                        C.ALPHA_TOK: a, "_entropy_bins": bins(a), "_eval_history": []} for m, t, a in rows])
    lines = entropy_table(df).splitlines()
    assert lines[0] == "A, γ = 5, T = 1.0" and lines[2] == "| teacher entropy (nats) | adaptive | rkl |"
    assert lines[4] == "| [0.1, 0.316) | 25.0 (10) | 50.0 (10) |"
    assert lines[5] == "| [1, 3.16) | 12.5 (7) | 25.0 (7) |"
    assert "B, γ = 5, T = 1.0" in lines and "| [1, 3.16) | 37.5 (7) |" in lines
    from distillspec.report_plots import entropy_figure

    for name, data, panels in (("two_tasks", df, 2), ("one_task", df[df["task"] == "A"], 1)):
        out = tmp_path / name
        out.mkdir()
        assert out / FIG_ENTROPY in plots(data, out)
        assert matplotlib.image.imread(out / FIG_ENTROPY).shape[1] > 0
        assert len(entropy_figure(data).axes) == panels  # one panel per task
