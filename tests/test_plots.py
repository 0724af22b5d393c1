"""The figures speak to a person. Entropy tick labels do not overlap, the positions legend reads
6 (not 6.0), γ ticks are the integer γ values (no 4.8 ... 5.2 around a single γ), step ticks are whole numbers, and
no title, axis label or legend shows a raw metric key (`metric = sd/tau`, `sd/alpha_tok`, `gamma`, `value`)."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from distillspec import constants as C  # noqa: E402
from distillspec import report_plots as rp  # noqa: E402

RAW = re.compile(r"(metric = |sd/|val/|quality/|train/|_tok\b(?<!α_tok)|^gamma$|^value$|^temperature$|^count$)")


def _bins(lo_exp: float, hi_exp: float, counts, seed: int):
    rng = np.random.default_rng(seed)
    edges = np.logspace(lo_exp, hi_exp, len(counts) + 1)
    return [{"bin_lo": float(a), "bin_hi": float(b), "count": float(c), "acceptance": float(rng.uniform(0.1, 0.9))}
            for a, b, c in zip(edges[:-1], edges[1:], counts)]


def _row(method, task="ArithmeticTask", gamma=3, temperature=1.0, bins=None, steps=(0, 2, 4), i=0):
    return {"method": method, "rollout": None if method == "baseline" else "teacher", "task": task, "gamma": gamma,
            "temperature": temperature, C.ALPHA_TOK: 0.1 + 0.05 * i, C.BLOCK_EFFICIENCY: 1.1 + 0.1 * i,
            C.SPEEDUP: 0.5 + 0.1 * i, C.SPEEDUP_PREDICTED: 0.6, C.DRAFT_QUALITY_PREFIX + C.ACCURACY: 0.1 * i,
            "_entropy_bins": bins if bins is not None else _bins(-0.5, 0.5, [6, 9, 12, 7], i),
            "_eval_history": [{"step": s, C.VAL_PREFIX + C.ALPHA_TOK: 0.1 + 0.01 * s} for s in steps]}


CASES = {
    # a tiny-pair sweep: one γ, a few positions per bin, entropies within one decade
    "one_gamma": pd.DataFrame([_row(m, i=i) for i, m in enumerate(["baseline", "fkl/teacher", "rkl/teacher"])]),
    # two tasks (one panel each), entropies over five decades
    "tasks": pd.DataFrame([_row(m, task=t, gamma=5, i=i, bins=_bins(-4, 1, [3, 40, 120, 300, 800, 50, 20, 7, 5], i))
                           for t in ("ArithmeticTask", "DialogSumTask") for i, m in enumerate(["baseline", "fkl"])]),
    # a γ grid, greedy and sampled
    "gammas": pd.DataFrame([_row(m, gamma=g, temperature=t, i=i) for g in (3, 5, 7) for t in (0.0, 1.0)
                            for i, m in enumerate(["baseline", "rkl/mixed"])]),
}


def _legend_texts(fig) -> list[str]:
    out = []
    for legend in [*fig.legends, *[ax.get_legend() for ax in fig.axes]]:
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()] + [legend.get_title().get_text()]
    return out


def _texts(fig) -> list[str]:
    out = [t.get_text() for t in fig.texts] + _legend_texts(fig)
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
    return [t for t in out if t]


def _visible_xticklabels(ax):
    lo, hi = ax.get_xlim()
    return [t for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi and t.get_text()]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.mark.parametrize("case", sorted(CASES))
def test_entropy_figure_ticks_do_not_overlap_and_counts_are_integers(case):
    fig = rp.entropy_figure(CASES[case])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = _visible_xticklabels(ax)
        assert len(labels) >= 2, [t.get_text() for t in labels]
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, [t.get_text() for t in labels]
        assert not any("×" in t.get_text() or "$" in t.get_text() for t in labels)
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    end = legend.index(rp.SETTING) if rp.SETTING in legend else len(legend)  # a γ grid: the SD setting section
    sizes = legend[legend.index(rp.COUNT_LABEL) + 1:end]
    assert sizes and all(s.isdigit() for s in sizes), legend


@pytest.mark.parametrize("case, ticks", [("one_gamma", ["3"]), ("gammas", ["3", "5", "7"])])
def test_gamma_figure_ticks_are_the_integer_gammas_and_titles_are_names(case, ticks):
    fig = rp.gamma_figure(CASES[case])
    fig.canvas.draw()
    for ax in fig.axes:
        assert [t.get_text() for t in _visible_xticklabels(ax)] == ticks
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [rp.label(k) for k in (C.BLOCK_EFFICIENCY, C.SPEEDUP, C.SPEEDUP_PREDICTED)]
    if case == "gammas":
        assert {"greedy (T = 0)", "T = 1"} <= set(_texts(fig))


def test_training_figure_steps_are_whole_numbers():
    for case in ("one_gamma", "tasks"):
        fig = rp.training_figure(CASES[case])
        fig.canvas.draw()
        for ax in fig.axes:
            labels = [t.get_text() for t in _visible_xticklabels(ax)]
            assert labels and all(re.fullmatch(r"[0-9]+", s.replace("−", "-")) for s in labels), labels


def test_a_heldout_curve_is_drawn_with_its_own_label():
    """train.curve=heldout jobs: the curve shows held-out acceptance, named as such (not as a periodic SD eval)."""
    df = CASES["one_gamma"].copy()
    df["_eval_history"] = [[{"step": s, C.VAL_PREFIX + C.ALPHA_HELDOUT: 0.9 - 0.01 * s} for s in (0, 16, 32)]
                           for _ in range(len(df))]
    fig = rp.training_figure(df)
    assert fig is not None
    assert fig.axes[0].get_ylabel() == rp.label(C.ALPHA_HELDOUT)
    assert sorted({round(y, 4) for line in fig.axes[0].get_lines() for y in line.get_ydata()}) == [0.58, 0.74, 0.9]


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_raw_keys_or_float_counts_in_any_figure(case):
    for make in (rp.entropy_figure, rp.gamma_figure, rp.training_figure, rp.quality_figure):
        fig = make(CASES[case])
        if fig is None:
            continue
        fig.canvas.draw()
        texts = _texts(fig)
        assert not [t for t in texts if RAW.search(t)], (make.__name__, texts)
        legend = [t for t in _legend_texts(fig) if re.fullmatch(r"[0-9]+\.0", t)]
        assert not legend, (make.__name__, legend)
    if case == "tasks":  # task panels are named by task, not by class
        assert [ax.get_title() for ax in rp.entropy_figure(CASES[case]).axes] == ["Arithmetic", "DialogSum"]


def test_before_after_figure_has_whole_steps_and_readable_entropy_ticks(tmp_path, monkeypatch):
    from distillspec.before_after import before_after_plot

    made = []
    monkeypatch.setattr(rp, "save", lambda fig, path, dpi=120: made.append(fig) or path)
    hist = [{"step": s, C.VAL_PREFIX + C.ALPHA_EXPECTED: 0.2, C.VAL_PREFIX + C.ALPHA_TOK: 0.1} for s in (0, 30, 60)]
    before_after_plot(hist, _bins(-0.5, 0.5, [6, 9, 12, 7], 0), _bins(-0.5, 0.5, [6, 9, 12, 7], 1),
                      tmp_path / "ba.png")
    fig = made[0]
    fig.canvas.draw()
    steps, entropy = fig.axes
    assert [t.get_text() for t in _visible_xticklabels(steps)] == ["0", "30", "60"]
    labels = [t.get_text() for t in _visible_xticklabels(entropy)]
    assert len(labels) >= 2 and not any("×" in s or "$" in s for s in labels), labels
    assert not [t for t in _texts(fig) if RAW.search(t)]


def test_quality_figure_has_one_panel_per_task_with_its_own_metric():
    """Arithmetic reports accuracy, DialogSum ROUGE: each task's panel plots its own metric (none is dropped)."""
    rows = []
    for i, m in enumerate(["baseline", "fkl"]):
        a = _row(m, task="ArithmeticTask", i=i)
        d = _row(m, task="DialogSumTask", i=i)
        d.pop(C.DRAFT_QUALITY_PREFIX + C.ACCURACY)
        d[C.DRAFT_QUALITY_PREFIX + "rouge1"] = 0.2 + 0.05 * i
        rows += [a, d]
    fig = rp.quality_figure(pd.DataFrame(rows))
    assert [ax.get_title() for ax in fig.axes] == ["Arithmetic: task quality vs acceptance",
                                                   "DialogSum: task quality vs acceptance"]
    assert [ax.get_ylabel() for ax in fig.axes] == [rp.label(C.DRAFT_QUALITY_PREFIX + C.ACCURACY),
                                                    rp.label(C.DRAFT_QUALITY_PREFIX + "rouge1")]
    assert all(len(ax.collections[0].get_offsets()) == 2 for ax in fig.axes)  # both methods' points drawn


def test_lossless_sd_output_quality_is_not_plotted_as_the_drafts():
    """Without draft-only quality, the SD outputs' quality is the target's when SD is lossless: no figure; a lossy
    sweep (lenience) plots it."""
    rows = []
    for i, m in enumerate(["baseline", "fkl"]):
        r = _row(m, i=i)
        r.pop(C.DRAFT_QUALITY_PREFIX + C.ACCURACY)
        r[C.QUALITY_PREFIX + C.ACCURACY] = 0.3
        r["lenience"] = "none"
        rows.append(r)
    assert rp.quality_figure(pd.DataFrame(rows)) is None
    lossy = pd.DataFrame(rows).assign(lenience=["none", "linear"])
    fig = rp.quality_figure(lossy)
    assert fig is not None and fig.axes[0].get_ylabel() == rp.label(C.QUALITY_PREFIX + C.ACCURACY)


def test_entropy_figure_draws_one_line_per_gamma():
    """Points of jobs with different γ are not joined into one line per method."""
    df = pd.DataFrame([_row("rkl/teacher", gamma=g, i=0) for g in (3, 5)])  # the same bins' entropies
    fig = rp.entropy_figure(df)
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata())]
    assert len(lines) == 2
    assert {"γ = 3", "γ = 5"} <= set(_legend_texts(fig))


def test_before_after_figure_without_a_curve_warns_nothing(tmp_path, monkeypatch):
    """train.eval_every=0 (no periodic evaluation) plots without matplotlib's 'No artists with labels'."""
    import warnings

    from distillspec.before_after import before_after_plot

    made = []
    monkeypatch.setattr(rp, "save", lambda fig, path, dpi=120: made.append(fig) or path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before_after_plot([], _bins(-0.5, 0.5, [6, 9], 0), _bins(-0.5, 0.5, [6, 9], 1), tmp_path / "ba.png")
    assert "train.eval_every" in " ".join(t.get_text() for t in made[0].axes[0].texts)
