"""Turn a sweep directory into tables and plots.

    python -m distillspec.report multirun/<name> [--wandb] [--out DIR]

Reads every job's metrics.json (+ per_example.json and .hydra/config.yaml) below the directory and
writes into it (or --out): summary.csv, report.md (the reference study's Table 1 layout with best
values bold and bootstrap confidence intervals, plus a full per-job table), and seaborn PNGs:
acceptance vs teacher entropy (Figure 1), tau and speedup vs gamma, acceptance over training steps,
task quality vs acceptance.

A job whose metrics.json, per_example.json or .hydra/config.yaml is damaged is named in one line (stderr) and
listed under "Unreadable jobs" (status "unreadable" in summary.csv); the other jobs are reported as usual. A
sweep dir that cannot be written is refused in one line: pass --out <dir>.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from distillspec import constants as C
from distillspec.report_jobs import (FIX, LABEL_PARTS, SEED_MARK, collect, collect_failures,  # noqa: F401
                                     load_job, mark_seeds, method_label, read_job_config, read_job_json,
                                     train_entropy_shares)
from distillspec.report_plots import FIG_ENTROPY, FIG_GAMMA, FIG_QUALITY, FIG_TRAINING, plots  # noqa: F401
from distillspec.report_plots import baseline_first as _baseline_first
from distillspec.report_plots import loss_of as _loss
from distillspec.sd.metrics import RATIO_PARTS, bootstrap_ci, paired_bootstrap_ci

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"

def train_entropy_table(df: pd.DataFrame) -> str:
    """Markdown: per trained job, the share (%) of its training tokens in each teacher-entropy bin (what the
    loss saw; the SD table's positions are what evaluation saw); "" when no job logged them."""
    rows = [(r["method"], r["_train_entropy"]) for _, r in df.iterrows() if r.get("_train_entropy")]
    if not rows:
        return ""
    bins = sorted({b for _, shares in rows for b in shares}, key=lambda b: float(b.split("-")[0]))
    lines = ["| method | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
    for method, shares in sorted(rows, key=lambda r: _baseline_first(r[0])):
        lines.append(f"| {method} | " + " | ".join(f"{100 * shares[b]:.1f}" if b in shares else "–" for b in bins)
                     + " |")
    return "\n".join(lines)


def unreadable_table(bad: pd.DataFrame) -> str:
    """Markdown table of the jobs left out for a damaged file ("" when none)."""
    return "" if bad.empty else bad.assign(job=[Path(j).name for j in bad["job"]])[["job", "status", "error"]] \
        .to_markdown(index=False)


def failures_table(failed: pd.DataFrame) -> str:
    """Markdown table of the failed jobs ("" when none)."""
    if failed.empty:
        return ""
    cols = ["job", "status", "method", "gamma", "error_type", "exit_code", "error"]
    shown = failed.assign(job=[Path(j).name for j in failed["job"]])[cols]
    return shown.to_markdown(index=False)


def _fmt_alpha(row: pd.Series, key: str, bold: bool) -> str:
    val = f"{100 * row[key]:.2f}"
    lo, hi = row.get(key + "_ci_lo"), row.get(key + "_ci_hi")
    if lo is not None and not pd.isna(lo):
        val += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"**{val}**" if bold else val


def table1(df: pd.DataFrame) -> str:
    """Rows: target/draft/task (and gamma); columns: alpha_seq and alpha_tok per method, best bold."""
    lines = []
    methods = sorted(df["method"].unique(), key=_baseline_first)
    header = "| pair / task | γ | T | " + " | ".join(f"{m} α_seq | {m} α_tok" for m in methods) + " | n |"
    lines += [header, "|" + "---|" * (4 + 2 * len(methods))]
    keys = ["target", "draft", "task", "gamma", "temperature"]
    for (target, draft, task, gamma, temp), grp in df.groupby(keys, dropna=False):
        best = {k: grp[k].max() for k in (C.ALPHA_SEQ, C.ALPHA_TOK)}
        cells = []
        for m in methods:
            sub = grp[grp["method"] == m]
            if sub.empty:
                cells += ["–", "–"]
                continue
            r = sub.sort_values(C.ALPHA_TOK).iloc[-1]
            cells += [_fmt_alpha(r, k, r[k] == best[k] and len(grp) > 1) for k in (C.ALPHA_SEQ, C.ALPHA_TOK)]
        n = int(grp[C.NUM_DRAFTED].max()) if C.NUM_DRAFTED in grp else ""
        lines.append(f"| {Path(str(target)).name} ← {Path(str(draft)).name} / {task} | {gamma} | {temp} | "
                     + " | ".join(cells) + f" | {n} drafted |")
    return "\n".join(lines)


def recipe_table(df: pd.DataFrame) -> str:
    """DistillSpec's recipe view: α_tok (%) of trained drafts, rows = data source, columns = loss, one block per
    (γ, T), best bold; the untrained baseline of the same (γ, T) in the caption. "" unless rollouts vary."""
    trained = df[(df["method"] != "baseline") & ~df["method"].str.contains(SEED_MARK, regex=False)]
    if trained.empty or trained["rollout"].nunique() < 2:
        return ""
    trained = trained.assign(loss=_loss(trained["method"]))
    losses = sorted(trained["loss"].unique())
    blocks = []
    for (gamma, temp), grp in trained.groupby(["gamma", "temperature"], dropna=False):
        base = df[(df["method"] == "baseline") & (df["gamma"] == gamma) & (df["temperature"] == temp)]
        caption = f"γ = {gamma}, T = {temp}" + (
            f"; untrained baseline α_tok {100 * base[C.ALPHA_TOK].max():.2f}" if not base.empty else "")
        lines = [caption, "", "| data source | " + " | ".join(losses) + " |", "|" + "---|" * (1 + len(losses))]
        best = grp[C.ALPHA_TOK].max()
        for source in sorted(grp["rollout"].unique()):
            cells = []
            for loss in losses:
                sub = grp[(grp["rollout"] == source) & (grp["loss"] == loss)]
                r = sub.sort_values(C.ALPHA_TOK).iloc[-1] if not sub.empty else None
                cells.append("–" if r is None else _fmt_alpha(r, C.ALPHA_TOK, r[C.ALPHA_TOK] == best))
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


PAIRED_KEYS = (C.ALPHA_TOK, C.ALPHA_SEQ, C.ALPHA_EXPECTED, C.BLOCK_EFFICIENCY)


def ci_table(df: pd.DataFrame) -> str:
    """One row per job: α_tok, α_seq, α_expected (%) and τ, each with its 95 % bootstrap CI over prompts; ""
    when no job has per-prompt records."""
    if not any(k + "_ci_lo" in df for k in PAIRED_KEYS):
        return ""
    lines = ["| method | task | γ | T | α_tok | α_seq | α_expected | τ | prompts |", "|" + "---|" * 9]
    rows = sorted((r for _, r in df.iterrows()), key=lambda r: (str(r["task"]), str(r["gamma"]), str(r["temperature"]),
                                                               _baseline_first(str(r["method"]))))
    for r in rows:
        cells = []
        for key in PAIRED_KEYS:
            scale, fmt = (1.0, "{:.3f}") if key == C.BLOCK_EFFICIENCY else (100.0, "{:.2f}")
            lo, hi = r.get(key + "_ci_lo"), r.get(key + "_ci_hi")
            cell = fmt.format(scale * r[key]) if key in r and not pd.isna(r[key]) else "–"
            if lo is not None and not pd.isna(lo):
                cell += f" [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"
            cells.append(cell)
        n = len(r["_per_example"]) if r.get("_per_example") is not None else ""
        lines.append(f"| {r['method']} | {r['task']} | {r['gamma']} | {r['temperature']} | " + " | ".join(cells)
                     + f" | {n} |")
    return "\n".join(lines)


def paired_table(df: pd.DataFrame) -> str:
    """Each trained job against the untrained draft (method baseline) of the same pair, task, γ and T, on the same
    prompts: the difference of α_tok, α_seq, α_expected (points) and τ, each with its paired bootstrap 95 % CI
    (prompts resampled together). "" when no job has a baseline to pair with."""
    lines = []
    keys = ["target", "draft", "task", "gamma", "temperature"]
    for _, grp in df.groupby(keys, dropna=False):
        base = grp[grp["method"] == "baseline"]
        if base.empty or base.iloc[0]["_per_example"] is None:
            continue
        a = base.iloc[0]["_per_example"]
        for _, r in grp[grp["method"] != "baseline"].sort_values("method").iterrows():
            b = r["_per_example"]
            if b is None or len(b) != len(a):
                continue
            cells = []
            for key in PAIRED_KEYS:
                num, den = RATIO_PARTS[key]
                scale = 1.0 if key == C.BLOCK_EFFICIENCY else 100.0
                d, lo, hi = (scale * x for x in paired_bootstrap_ci(a[num], a[den], b[num], b[den]))
                cells.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            lines.append(f"| {r['method']} | {r['task']} | {r['gamma']} | {r['temperature']} | " + " | ".join(cells)
                         + f" | {len(a)} |")
    if not lines:
        return ""
    head = "| method | task | γ | T | Δα_tok | Δα_seq | Δα_expected | Δτ | prompts |"
    return "\n".join([head, "|" + "---|" * 9, *lines])


def seed_table(df: pd.DataFrame) -> str:
    """Cells run with more than one seed: α_seq, α_tok and α_expected (%) per seed; "" when no cell was."""
    base = df["method"].str.split(SEED_MARK, regex=False).str[0]
    repeated = sorted(m for m in base.unique() if (base == m).sum() > 1)
    if not repeated:
        return ""
    lines = ["| cell | seed | α_seq | α_tok | α_expected |", "|---|---|---|---|---|"]
    for m in repeated:
        for _, r in df[base == m].sort_values("seed").iterrows():
            lines.append(f"| {m} | {r['seed']} | {_fmt_alpha(r, C.ALPHA_SEQ, False)} | "
                         f"{_fmt_alpha(r, C.ALPHA_TOK, False)} | {100 * r[C.ALPHA_EXPECTED]:.2f} |")
    return "\n".join(lines)


def entropy_table(df: pd.DataFrame) -> str:
    """Acceptance (%) per teacher-entropy bin (SD eval, recorded positions) per method: one block per (task, γ, T),
    rows = bins, cells "acceptance (positions)"; bins with too few positions in a job are "–"."""
    blocks = []
    for (task, gamma, temp), grp in df.groupby(["task", "gamma", "temperature"], dropna=False):
        methods = sorted(grp["method"].unique(), key=_baseline_first)
        cells: dict[tuple[float, float], dict[str, str]] = {}
        for _, r in grp.iterrows():
            for b in r["_entropy_bins"]:
                cells.setdefault((b["bin_lo"], b["bin_hi"]), {})[r["method"]] = \
                    f"{100 * b['acceptance']:.1f} ({int(b['count'])})"
        if not cells:
            continue
        lines = [f"{task}, γ = {gamma}, T = {temp}", "", "| teacher entropy (nats) | " + " | ".join(methods) + " |",
                 "|" + "---|" * (1 + len(methods))]
        for lo, hi in sorted(cells):
            lines.append(f"| [{lo:.3g}, {hi:.3g}) | " + " | ".join(cells[(lo, hi)].get(m, "–") for m in methods) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def position_table(df: pd.DataFrame) -> str:
    """Markdown: one row per job, the per-position acceptance rates (%) k = 1..gamma; '' when none recorded."""
    keys = sorted((c for c in df.columns if c.startswith(C.ACCEPT_POS_PREFIX)),
                  key=lambda c: int(c[len(C.ACCEPT_POS_PREFIX):]))
    if not keys:
        return ""
    lines = ["| method | task | γ | " + " | ".join(f"k={c[len(C.ACCEPT_POS_PREFIX):]}" for c in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for _, row in df.iterrows():
        cells = ["–" if pd.isna(row[c]) else f"{100 * row[c]:.1f}" for c in keys]
        lines.append(f"| {row.get('method', '')} | {row.get('task', '')} | {row.get('gamma', '')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(sweep_dir: Path, out: Path | None = None, wandb: bool = False) -> dict[str, Path]:
    """Aggregate `sweep_dir`; write summary.csv, report.md and PNGs into `out` (default: sweep_dir)."""
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    failed = collect_failures(sweep_dir)
    unreadable: list[dict[str, Any]] = []
    df = collect(sweep_dir, allow_empty=True, unreadable=unreadable)
    bad = pd.DataFrame(unreadable, columns=["job", "status", "error"])
    if df.empty and failed.empty and bad.empty:
        raise SystemExit(f"no {C.METRICS_FILE} with SD metrics under {sweep_dir}")
    public = df[[c for c in df.columns if not c.startswith("_")]]
    pd.concat([public.assign(status="ok"), failed, bad], ignore_index=True).to_csv(out / SUMMARY_CSV, index=False)
    failures_md = ["## Failed jobs", "", failures_table(failed), ""] if not failed.empty else []
    failures_md += ["## Unreadable jobs (a damaged file; left out of the tables)", "", unreadable_table(bad), ""] \
        if not bad.empty else []
    if df.empty:  # every job failed: the failures are the report
        (out / REPORT_MD).write_text("\n".join([f"# Sweep report: {sweep_dir}", "", f"{len(failed)} failed jobs, "
                                                f"{len(bad)} unreadable, none with SD metrics.", "",
                                                *failures_md]) + "\n")
        return {"summary": out / SUMMARY_CSV, "report": out / REPORT_MD}
    figs = plots(df, out)
    cols = ["method", "task", "gamma", "temperature", C.ALPHA_TOK, C.ALPHA_SEQ, C.ALPHA_EXPECTED,
            C.BLOCK_EFFICIENCY, C.MEAN_ACCEPTED_LEN, C.MEAN_ACCEPTANCE_LENGTH, C.ALPHA_GREEDY_DRAFT, C.SPEEDUP,
            C.SPEEDUP_PREDICTED, C.COST_RATIO, C.PEAK_RSS_GIB]
    cols += [c for c in df.columns if c.startswith((C.QUALITY_PREFIX, C.DRAFT_QUALITY_PREFIX))]
    cols = [c for c in cols if c in df.columns]
    recipe = recipe_table(df)
    by_entropy = entropy_table(df)
    seeds = seed_table(df)
    paired = paired_table(df)
    with_cis = ci_table(df)
    train_entropy = train_entropy_table(df)
    by_position = position_table(df)
    md = [f"# Sweep report: {sweep_dir}", "", f"{len(df)} jobs with SD metrics"
          + (f", {len(failed)} failed (see Failed jobs)" if not failed.empty else "")
          + (f", {len(bad)} unreadable (see Unreadable jobs)" if not bad.empty else "") + ".", "", *failures_md,
          "## Acceptance (α in %, 95% bootstrap CI over examples; best per row in bold)", "", table1(df), "",
          *(["## Per job (α in %, τ; 95% bootstrap CI over prompts)", "", with_cis, ""] if with_cis else []),
          *(["## Against the untrained draft (difference on the same prompts; α in points, paired bootstrap "
             "95% CI)", "", paired, ""] if paired else []),
          *(["## Recipe grid (α_tok in %, 95% CI; best bold)", "", recipe, ""] if recipe else []),
          *(["## Cells run with more than one seed (%, 95% CI)", "", seeds, ""] if seeds else []),
          *(["## Acceptance by teacher-entropy bin (%, positions in parentheses)", "", by_entropy, ""]
            if by_entropy else []),
          *(["## Teacher entropy of the training tokens (% of tokens per bin in nats, mean over steps)", "",
             train_entropy, ""] if train_entropy else []),
          *(["## Acceptance per drafted position (% of blocks whose k-th drafted token was accepted)", "",
             by_position, ""] if by_position else []),
          "## All jobs", "", public[cols].to_markdown(index=False, floatfmt=".4f"), "", "## Figures", ""]
    md += [f"![{p.stem}]({p.name})" for p in figs]
    (out / REPORT_MD).write_text("\n".join(md) + "\n")
    if wandb:
        log_to_wandb(public, figs, sweep_dir, out)
    return {"summary": out / SUMMARY_CSV, "report": out / REPORT_MD, **{p.stem: p for p in figs}}


def log_to_wandb(df: pd.DataFrame, figs: list[Path], sweep_dir: Path, out: Path | None = None) -> None:
    """Log the summary table and figures as one W&B run (offline unless WANDB_API_KEY is set; its files in
    `out`, default the sweep dir)."""
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="distillspec", job_type="report", name=f"report/{sweep_dir.name}", mode=mode,
                     dir=str(out or sweep_dir))
    run.log({"summary": wandb.Table(dataframe=df.astype(str)),
             **{p.stem: wandb.Image(str(p)) for p in figs}})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--wandb", action="store_true", help="also log tables and figures to W&B")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"not a directory: {args.sweep_dir}")
    out = args.out or args.sweep_dir
    try:  # before reading the jobs: a file must be creatable in `out`
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):  # (root passes this, then the real write below decides)
            raise PermissionError(13, "Permission denied", str(out))
        tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-").close()
        written = write_report(args.sweep_dir, args.out, args.wandb)
    except OSError as exc:  # a read-only sweep dir (or a report file in it)
        where = exc.filename or out
        print(f"error: cannot write the report into {out} ({where}: {exc.strerror or exc}); pass --out <dir> to "
              "write it elsewhere", file=sys.stderr)
        sys.exit(C.EXIT_CONFIG_ERROR)
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
