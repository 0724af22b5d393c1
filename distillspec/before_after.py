"""What distillation bought, for one run: the untrained and the trained draft evaluated on the same prompts.

    before_after_table(before, after) -> markdown table: alpha_expected, alpha_tok, alpha_seq, tau (each with a
        95 % bootstrap CI over prompts), measured speedup, predicted speedups (no CI: one timing each)
    before_after_plot(history, before_bins, after_bins, path) -> PNG: acceptance over training steps, and
        acceptance by teacher-entropy bin before vs after

Plain pandas/matplotlib; no Lightning, no Hydra.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from distillspec import constants as C
from distillspec.sd.metrics import RATIO_PARTS, bootstrap_ci

TABLE_FILE = "before_after.md"
PLOT_FILE = "before_after.png"
LABELS = C.LABELS


def _cell(metrics: dict[str, float], per_example: Sequence[dict[str, Any]], key: str) -> str:
    value = metrics.get(key, math.nan)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in RATIO_PARTS and per_example:
        num, den = RATIO_PARTS[key]
        if all(num in r and den in r for r in per_example):
            lo, hi = bootstrap_ci([r[num] for r in per_example], [r[den] for r in per_example])
            return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{value:.3f}"


def table_keys(metrics: dict[str, float]) -> list[str]:
    """Rows of the table: the acceptance metrics, then every speedup the evaluation measured or predicted."""
    positions = sorted((k for k in metrics if k.startswith(C.ACCEPT_POS_PREFIX)),
                       key=lambda k: int(k[len(C.ACCEPT_POS_PREFIX):]))
    return [C.ALPHA_EXPECTED, C.ALPHA_TOK, C.ALPHA_SEQ, C.BLOCK_EFFICIENCY, C.MEAN_ACCEPTANCE_LENGTH, *positions,
            C.ALPHA_GREEDY_DRAFT, C.SPEEDUP, C.SPEEDUP_PREDICTED, C.SPEEDUP_PREDICTED_V, C.COST_RATIO,
            C.VERIFY_COST_RATIO, C.GAMMA]


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """before/after: {"metrics": {...}, "per_example": [...]} -> markdown table (95 % bootstrap CIs over prompts)."""
    keys = table_keys(after["metrics"])
    n = len(after.get("per_example") or [])
    lines = [f"| metric ({n} prompts, 95 % bootstrap CI) | untrained draft | distilled draft |", "|---|---|---|"]
    for key in keys:
        if key not in after["metrics"] and key not in before["metrics"]:
            continue
        lines.append(f"| {C.label(key)} | {_cell(before['metrics'], before.get('per_example'), key)} | "
                     f"{_cell(after['metrics'], after.get('per_example'), key)} |")
    return "\n".join(lines) + "\n"


def before_after_plot(history: Sequence[dict[str, float]], before_bins: Sequence[dict[str, float]],
                      after_bins: Sequence[dict[str, float]], path: Path) -> Path:
    """Two panels: periodic-eval acceptance vs training step; acceptance per teacher-entropy bin before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillspec.report_plots import integer_axis, log_entropy_axis, save

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in ((C.ALPHA_EXPECTED, "o-"), (C.ALPHA_TOK, "s--")):
        pts = [(h["step"], h[C.VAL_PREFIX + key]) for h in history if C.VAL_PREFIX + key in h]
        if pts:
            ax1.plot(*zip(*pts), style, label=LABELS[key])
    ax1.set(xlabel="training step", ylabel="acceptance", title="Acceptance over training (periodic SD eval)",
            ylim=(0, 1))
    integer_axis(ax1, [h["step"] for h in history] if len(history) <= 12 else None)
    if ax1.get_lines():
        ax1.legend(loc="upper left")
    else:  # nothing to draw (and no empty legend: matplotlib warns about one)
        ax1.text(0.5, 0.5, "no periodic SD evaluation\n(train.eval_every=0)", ha="center", va="center",
                 transform=ax1.transAxes, color="0.4")
    all_mids = []
    for bins, label, style in ((before_bins, "untrained draft", "o--"), (after_bins, "distilled draft", "o-")):
        if bins:
            mids = [math.sqrt(max(b["bin_lo"], 1e-5) * min(b["bin_hi"], 1e2)) for b in bins]
            ax2.plot(mids, [b["acceptance"] for b in bins], style, label=label)
            all_mids += mids
    ax2.set(xlabel="teacher entropy at the position (nats, log bins)", ylabel="acceptance rate",
            title="Acceptance by teacher entropy", ylim=(0, 1))
    log_entropy_axis(ax2, all_mids)
    if ax2.get_lines():
        ax2.legend(loc="upper right")
    fig.tight_layout()
    return save(fig, path, dpi=110)
