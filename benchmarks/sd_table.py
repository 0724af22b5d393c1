"""Rows and tables of `bench_sd.py` (one timed method per row), and machine facts for its header."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    """One timed generation over all prompts."""

    part: str
    method: str
    draft: str
    batch: int
    temperature: float
    outputs: list[list[int]]
    seconds: float
    metrics: dict | None = None  # SD metrics (constants' names) for SD rows
    vs: float | None = None  # ratio against this row's baseline (see `baseline`)
    baseline: str = ""
    same_as_target: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tps(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _load1(text: str) -> float:
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return 0.0


def same_rows(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


# --- table ---------------------------------------------------------------------------------------------
def fmt(x, spec=".2f", suffix=""):
    import math

    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:{spec}}{suffix}"


def row_of(run: Run) -> list:
    from distillspec import constants as C

    m = run.metrics or {}
    temp = f"{run.temperature:g}" + (f", p {run.extra['top_p']:g}" if run.extra.get("top_p", 1.0) < 1 else "")
    ratio = fmt(run.vs, ".2f", "x") + (f" {run.baseline}" if run.vs is not None else "")
    if run.vs is not None and C.SPEEDUP_MIN in m and run.baseline == "speedup":
        ratio += f" ({m[C.SPEEDUP_MIN]:.2f}-{m[C.SPEEDUP_MAX]:.2f})"
    return [run.part, run.method, run.draft, run.batch, temp, run.tokens, fmt(run.seconds, ".1f"),
            fmt(run.tps, ".2f"), ratio, fmt(m.get(C.ALPHA_TOK), ".3f"), fmt(m.get(C.BLOCK_EFFICIENCY), ".3f"),
            fmt(m.get(C.COST_RATIO), ".3f"), fmt(m.get(C.VERIFY_COST_RATIO), ".2f"),
            fmt(m.get(C.SPEEDUP_PREDICTED), ".2f", "x"), fmt(m.get(C.SPEEDUP_PREDICTED_V), ".2f", "x"),
            fmt(m.get(C.BOOKKEEPING_FRACTION), ".1%"), run.same_as_target, fmt(run.extra.get("cpu_use"), ".0%")]


HEADERS = ["part", "method", "draft", "B", "T", "tokens", "time s", "tok/s", "ratio (min-max)", "α_tok", "τ", "c",
           "v", "pred. τ/(cγ+1)", "pred. τ/(cvγ+v)", "bookkeeping", "= target greedy", "CPU use"]
PHASE_HEADERS = ["SD row", "SD s", "prefill", "draft", "target", "other", "target-only s", "prefill", "decode"]


def phase_row(run: Run) -> list:
    """The recorded phase split of an evaluator row: seconds and share of its total."""
    from distillspec import constants as C

    m = run.metrics
    share = lambda k, tot: f"{m[k]:.2f} ({m[k] / max(m[tot], 1e-9):.0%})"  # noqa: E731
    return [f"{run.draft}, B={run.batch}, T={run.temperature:g}", fmt(m[C.SD_TIME], ".2f"),
            *(share(k, C.SD_TIME) for k in (C.SD_TIME_PREFILL, C.SD_TIME_DRAFT, C.SD_TIME_TARGET, C.SD_TIME_OTHER)),
            fmt(m[C.TARGET_TIME], ".2f"),
            *(share(k, C.TARGET_TIME) for k in (C.TARGET_TIME_PREFILL, C.TARGET_TIME_DECODE))]


def bookkeeping_of(sd) -> float:
    return max(0.0, 1.0 - (sd.time_draft + sd.time_target + sd.time_prefill) / max(sd.time_total, 1e-9))


GAP_HEADERS = ["SD row", "pred. τ/(cvγ+v)", "verify calls", "τ per call", "pred. from calls", "decode only",
               "prefill SD / target", "measured"]


def gap_row(run: Run) -> list:
    """From τ/(cvγ+v) to the measured speedup of an evaluator row, one cause per step.

    τ per call = target-only decoding steps / SD verification calls: the tokens per block a batch realises
    when its rows decode in lockstep (each call waits for the slowest row; τ averages over rows).
    pred. from calls = steps / (draft calls * c v + verify calls * v): the forward-time ratio of the calls
    made. decode only = target-only decode time / SD time after prefill (bookkeeping included on both sides).
    prefill SD / target: SD's prompt forwards (both models) over the target-only prefill. measured: with prefill.
    """
    from distillspec import constants as C

    m, k = run.metrics, run.extra["counts"]
    c, v = m[C.COST_RATIO], m[C.VERIFY_COST_RATIO]
    per_call = k["step_calls"] / max(k["verify_calls"], 1)
    from_calls = k["step_calls"] / max(k["draft_calls"] * c * v + k["verify_calls"] * v, 1e-9)
    decode = m[C.TARGET_TIME_DECODE] / max(m[C.SD_TIME] - m[C.SD_TIME_PREFILL], 1e-9)
    occupancy = k["row_blocks"] / max(k["row_calls"], 1)
    return [f"{run.draft}, B={run.batch}, T={run.temperature:g}", fmt(m[C.SPEEDUP_PREDICTED_V], ".2f", "x"),
            f"{k['verify_calls']} (rows busy {occupancy:.0%})", fmt(per_call, ".2f"), fmt(from_calls, ".2f", "x"),
            fmt(decode, ".2f", "x"), fmt(m[C.SD_TIME_PREFILL] / max(m[C.TARGET_TIME_PREFILL], 1e-9), ".2f"),
            fmt(m[C.SPEEDUP], ".2f", "x")]
