"""The sweep report's figures, with human labels (never raw metric keys), integer axes where values are integers,
and log-entropy axes whose tick labels do not collide.

    entropy_figure(df), gamma_figure(df), training_figure(df), quality_figure(df) -> matplotlib Figure or None
    plots(df, out) -> the PNGs written (report.FIG_* names)
    label(key) -> the display name of a metric key (constants.LABELS; val/, quality/ and draft_quality/ prefixes)
    log_entropy_axis(ax, values) / integer_axis(ax, values): the shared axis treatments (before_after uses them)

`df` is report.collect's table: one row per job with method, rollout, task, gamma, temperature, the metrics and
the private columns _entropy_bins and _eval_history.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from distillspec import constants as C

FIG_ENTROPY = "acceptance_vs_entropy.png"
FIG_GAMMA = "tau_speedup_vs_gamma.png"
FIG_TRAINING = "acceptance_over_training.png"
FIG_QUALITY = "quality_vs_acceptance.png"
COUNT_LABEL = "positions per bin"


def label(key: str) -> str:
    """Display name of a metric key: C.LABELS, with val/ (periodic eval) and quality prefixes spelled out."""
    if key in C.LABELS:
        return C.LABELS[key]
    if key.startswith(C.VAL_PREFIX):
        return label(key[len(C.VAL_PREFIX):])
    for prefix, whose in ((C.DRAFT_QUALITY_PREFIX, "draft's own generations"), (C.QUALITY_PREFIX, "SD output")):
        if key.startswith(prefix):
            name = key[len(prefix):]
            return f"{C.QUALITY_LABELS.get(name, name)} ({whose})"
    return key.split("/")[-1].replace("_", " ")


def task_label(task: Any) -> str:
    """'ArithmeticTask' (the class name metrics.json records) -> 'Arithmetic'."""
    name = str(task or "")
    return name[: -len("Task")] if name.endswith("Task") and len(name) > 4 else name


def sampling_label(temperature: Any) -> str:
    t = float(temperature) if temperature is not None and not pd.isna(temperature) else float("nan")
    return "greedy (T = 0)" if t == 0 else f"T = {t:g}"


def _tick_text(v: float) -> str:
    """Short plain labels: 0.001, 0.5, 2, 10; below 0.001 as 1e-4 (never 4×10⁻¹ beside 6×10⁻¹)."""
    if v >= 1e-3:
        return f"{v:g}"
    exp = math.floor(math.log10(v) + 1e-9)
    mant = v / 10**exp
    return f"1e{exp}" if abs(mant - 1) < 1e-6 else f"{mant:g}e{exp}"


def log_entropy_axis(ax, values: Iterable[float]) -> None:
    """Log x axis over `values` (bin midpoints, nats): one labelled tick per decade when they span two or more
    (every other decade past 6), else at 1-2-5 steps; minor ticks unlabelled."""
    from matplotlib.ticker import NullFormatter

    vals = np.asarray([v for v in values if v > 0], float)
    ax.set_xscale("log")
    if vals.size == 0:
        return
    lo, hi = vals.min() / 1.5, vals.max() * 1.5
    if hi / lo < 10:  # at least a decade, so a lone bin still gets ticks on both sides
        widen = math.sqrt(10 * lo / hi)
        lo, hi = lo / widen, hi * widen
    ax.set_xlim(lo, hi)
    decades = np.arange(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    if math.log10(hi / lo) >= 2:
        step = 1 if len(decades) <= 7 else 2
        ticks = [10.0**d for d in decades[::step]]
    else:
        ticks = [m * 10.0**d for d in decades for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= t <= hi] or [float(10 ** round(math.log10(np.median(vals))))]
    ax.set_xticks(ticks, [_tick_text(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def integer_axis(ax, values: Iterable[float] | None = None) -> None:
    """Integer ticks on x: exactly the given values when there are a few (γ), else whole numbers only (steps)."""
    from matplotlib.ticker import MaxNLocator

    vals = sorted({float(v) for v in values if v is not None and not pd.isna(v)}) if values is not None else []
    if vals and len(vals) <= 12 and all(v.is_integer() for v in vals):
        ax.set_xticks(vals, [str(int(v)) for v in vals])
        if len(vals) == 1:
            ax.set_xlim(vals[0] - 1, vals[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))


def _panels(rows: pd.DataFrame) -> tuple[list[tuple[str, pd.DataFrame]], str, list[str]]:
    """Split plot rows (columns method, rollout, task) into panels: one per task (hue = method) when tasks vary,
    else one per data source (hue = loss, baseline rows in every panel) when trained jobs' rollouts vary, else
    one panel (hue = method). Returns (panels as (title, rows), hue, order)."""
    trained = rows["method"] != "baseline"
    if "task" in rows and rows["task"].nunique() > 1:
        return ([(task_label(t), rows[rows["task"] == t]) for t in sorted(rows["task"].unique())], "method",
                sorted(rows["method"].unique(), key=baseline_first))
    if rows.loc[trained, "rollout"].nunique() > 1:
        rows = rows.assign(loss=loss_of(rows["method"]))
        panels = [(f"data source: {s}", pd.concat([rows[trained & (rows["rollout"] == s)], rows[~trained]]))
                  for s in sorted(rows.loc[trained, "rollout"].unique())]
        return panels, "loss", sorted(rows["loss"].unique(), key=baseline_first)
    return [("", rows)], "method", sorted(rows["method"].unique(), key=baseline_first)


def loss_of(methods: pd.Series) -> pd.Series:
    """The loss part of method labels (report.method_label: "<div>[+speckd][/<source>][@seed<n>]")."""
    return methods.str.split("@").str[0].str.split("/").str[0]


def baseline_first(method: str) -> tuple[bool, str]:
    """Sort key: baseline first, then alphabetical."""
    return method != "baseline", method


def _legend_outside(ax) -> None:
    import seaborn as sns

    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title_fontsize=8)


def _rename_legend(ax, names: dict[str, str]) -> None:
    """Replace seaborn's column names (section titles inside the legend) with display names."""
    legend = ax.get_legend()
    for text in legend.get_texts() if legend is not None else []:
        text.set_text(names.get(text.get_text(), text.get_text()))


SETTING = "SD setting"  # entropy_figure's style column: γ (and sampling) when they vary between jobs


def _setting_style(rows: pd.DataFrame) -> tuple[str | None, list[str] | None]:
    """Adds a SETTING column ("γ = 5", with ", greedy" / ", T = 1" when temperatures vary too) when γ or the
    temperature differ between rows, so each setting is its own line; returns (style column, order) or Nones."""
    gammas = rows["gamma"].nunique(dropna=False) > 1
    temps = "temperature" in rows and rows["temperature"].nunique(dropna=False) > 1
    if not (gammas or temps):
        return None, None
    key = rows[["gamma", "temperature"]].apply(tuple, axis=1) if temps else rows["gamma"]
    def whole(v: Any) -> str:
        return str(int(v)) if isinstance(v, (int, float)) and not pd.isna(v) and float(v).is_integer() else str(v)

    name = {k: ", ".join(([f"γ = {whole(k[0] if temps else k)}"] if gammas else []) + (
        [sampling_label(k[1])] if temps else [])) for k in key.unique()}
    rows[SETTING] = key.map(name)
    def order(k) -> tuple:
        return tuple(pd.to_numeric(pd.Series(list(k) if temps else [k]), errors="coerce").fillna(-1))

    return SETTING, [name[k] for k in sorted(name, key=order)]


def entropy_figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    bins = [dict(b, method=r["method"], gamma=r["gamma"], rollout=r["rollout"], task=r.get("task", ""),
                 temperature=r.get("temperature"))
            for _, r in df.iterrows() for b in r["_entropy_bins"]]
    if not bins:
        return None
    b = pd.DataFrame(bins)
    b["entropy"] = np.sqrt(b["bin_lo"].clip(lower=1e-5) * b["bin_hi"].clip(upper=1e2))
    b["count"] = b["count"].round().astype(int)  # positions: the size legend reads 6, not 6.0
    style, style_order = _setting_style(b)
    panels, hue, order = _panels(b)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 4 * len(panels), 4.5), sharey=True, squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        last = ax is axes[0][-1]
        sns.lineplot(data=data, x="entropy", y="acceptance", hue=hue, hue_order=order, style=style,
                     style_order=style_order, ax=ax, legend=False, alpha=0.6)
        sns.scatterplot(data=data, x="entropy", y="acceptance", hue=hue, hue_order=order, size="count",
                        sizes=(20, 300), style=style, style_order=style_order, ax=ax,
                        legend="brief" if last else False)
        ax.set(xlabel="teacher entropy (nats, log bins)", ylabel="acceptance rate",
               title=title or "Acceptance vs teacher entropy")
    for ax in axes[0]:
        log_entropy_axis(ax, b["entropy"])  # the same ticks on every panel
    _legend_outside(axes[0][-1])
    _rename_legend(axes[0][-1], {"count": COUNT_LABEL})
    return fig


def gamma_figure(df: pd.DataFrame):
    import seaborn as sns

    if not (df["gamma"].nunique() > 1 or C.SPEEDUP in df):
        return None
    cols = [c for c in (C.BLOCK_EFFICIENCY, C.SPEEDUP, C.SPEEDUP_PREDICTED) if c in df]
    data = df.assign(sampling=df["temperature"].map(sampling_label))
    long = data.melt(id_vars=["method", "gamma", "sampling"], value_vars=cols, var_name="metric")
    long["metric"] = long["metric"].map(label)
    style = "sampling" if data["sampling"].nunique() > 1 else None  # greedy and sampled: one line style each
    g = sns.relplot(data=long, x="gamma", y="value", hue="method", style=style, col="metric", kind="line",
                    marker="o", facet_kws={"sharey": False}, height=3.5,
                    hue_order=sorted(df["method"].unique(), key=baseline_first))
    g.set_titles("{col_name}")
    g.set_axis_labels("γ (draft tokens per block)", "")
    for ax in g.axes.flat:
        integer_axis(ax, df["gamma"])
    return g.figure


def training_figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    hist = [dict(h, method=r["method"], rollout=r["rollout"], task=r.get("task", "")) for _, r in df.iterrows()
            for h in r["_eval_history"]]
    rows = pd.DataFrame(hist)
    # the curve's measure: periodic SD evaluations (alpha_tok) or held-out acceptance (train.curve=heldout)
    keys = [C.VAL_PREFIX + k for k in (C.ALPHA_TOK, C.ALPHA_HELDOUT) if C.VAL_PREFIX + k in rows]
    if not keys:
        return None
    key = keys[0]
    how = ", periodic SD eval" if key.endswith(C.ALPHA_TOK) else ""
    panels, hue, order = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 4 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        sns.lineplot(data=data, x="step", y=key, hue=hue, hue_order=order, marker="o", ax=ax,
                     legend=ax is axes[0][-1])
        ax.set(xlabel="training step", ylabel=f"{label(key)}{how}",
               title=title or "Acceptance over training")
        integer_axis(ax)
    _legend_outside(axes[0][-1])
    return fig


def _quality_column(rows: pd.DataFrame) -> str | None:
    """The quality metric to plot for one task's rows: the draft's own (sd.draft_quality) when measured; else
    the SD outputs', but only when some job is lossy (with lossless SD it is the target's quality, the same
    for every draft up to sampling noise); None when neither has values."""
    def first(prefix: str) -> str | None:
        cols = [c for c in rows.columns if c.startswith(prefix) and rows[c].notna().any()]
        return cols[0] if cols else None

    lossy = "lenience" in rows and rows["lenience"].notna().any() and (
        rows["lenience"].dropna().astype(str) != "none").any()
    return first(C.DRAFT_QUALITY_PREFIX) or (first(C.QUALITY_PREFIX) if lossy else None)


def quality_figure(df: pd.DataFrame):
    """Task quality vs α_tok, one panel per task (each with its own metric, see _quality_column); None when no
    task has a quality worth plotting."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    groups = list(df.groupby(df["task"].map(task_label), sort=True)) if "task" in df else [("", df)]
    panels = [(task, rows, col) for task, rows in groups if (col := _quality_column(rows)) is not None]
    if not panels:
        return None
    order = sorted(df["method"].unique(), key=baseline_first)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 4.5 * len(panels), 4), squeeze=False)
    for ax, (task, rows, col) in zip(axes[0], panels):
        last = ax is axes[0][-1]
        sns.scatterplot(data=rows, x=C.ALPHA_TOK, y=col, hue="method", hue_order=order, s=80, ax=ax,
                        legend="brief" if last else False)
        ax.set(xlabel=label(C.ALPHA_TOK), ylabel=label(col),
               title=f"{task}: task quality vs acceptance" if task else "Task quality vs acceptance")
    _legend_outside(axes[0][-1])
    return fig


def plots(df: pd.DataFrame, out: Path) -> list[Path]:
    """Write every figure that df has data for into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    made = []
    for make, name in ((entropy_figure, FIG_ENTROPY), (gamma_figure, FIG_GAMMA), (training_figure, FIG_TRAINING),
                       (quality_figure, FIG_QUALITY)):
        fig = make(df)
        if fig is not None:
            made.append(save(fig, out / name))
    return made


def save(fig, path: Path, dpi: int = 120) -> Path:
    """PNG with everything inside (legends placed outside the axes included); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
