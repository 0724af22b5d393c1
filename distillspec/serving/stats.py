"""Sampling noise of the check's acceptance rates: bootstrap CIs over prompts, the noise-aware flag, and how
many prompts a given resolution needs.

At T > 0 each engine samples its own trajectories, so two correct engines give different rates on the same
prompts; the spread over prompts (each prompt a cluster of drafts) is the noise. Every rate here is a ratio
of sums over prompts, sum(num) / sum(den), and its CI resamples prompts with replacement: the percentile
bootstrap of `distillspec.sd.metrics.bootstrap_ci` (same draws for the same seed; a test holds them equal),
written here in numpy so that this package stays free of torch. A difference of two engines on the same
prompts is resampled paired (the same prompt indices for both).

Inputs are per-prompt count lists (length N prompts); numpy is imported where used.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

N_BOOT = 1000
LEVEL = 0.95
Z95 = 1.959963984540054  # normal quantile of LEVEL (two-sided), for the prompts-needed estimate


def _draws(n: int, n_boot: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def ratio_ci(num: Sequence[float], den: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL,
             seed: int = 0) -> tuple[float, float]:
    """Percentile CI of sum(num) / sum(den) over prompts resampled with replacement; (nan, nan) under 2
    prompts. num, den: (N,)."""
    import numpy as np

    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) < 2 or den.sum() <= 0:
        return math.nan, math.nan
    idx = _draws(len(num), n_boot, seed)
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def diff_ci(a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]],
            fb: Callable[[Any], Any] | None = None, *, n_boot: int = N_BOOT, level: float = LEVEL,
            seed: int = 0) -> dict[str, float]:
    """rate_a - fb(rate_b) with rate = sum(num) / sum(den) over the same N prompts, resampled paired.

    a, b: (num, den) per prompt, each (N,). fb: a transform of b's rate (e.g. an i.i.d. prediction from it;
    vectorised over a numpy array). Returns {diff, lo, hi, se} (se: the bootstrap standard deviation).
    """
    import numpy as np

    fb = fb or (lambda x: x)
    na, da = (np.asarray(x, dtype=float) for x in a)
    nb, db = (np.asarray(x, dtype=float) for x in b)
    if not (len(na) == len(da) == len(nb) == len(db)):
        raise ValueError(f"per-prompt counts of different lengths: {len(na)}, {len(da)}, {len(nb)}, {len(db)}")
    if len(na) < 2 or da.sum() <= 0 or db.sum() <= 0:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan}
    diff = float(na.sum() / da.sum() - fb(np.asarray(nb.sum() / db.sum())))
    idx = _draws(len(na), n_boot, seed)
    d = na[idx].sum(1) / np.maximum(da[idx].sum(1), 1e-12) - fb(nb[idx].sum(1) / np.maximum(db[idx].sum(1), 1e-12))
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "se": float(d.std(ddof=1))}


def flag_ci(ci: dict[str, float], band: float = 0.0) -> str:
    """DISAGREES only when the whole CI of the difference lies outside [-band, band]: band 0 for an exact
    claim (the CI excludes 0), a tolerance for an approximate prediction. n/a without a CI."""
    lo, hi = ci.get("lo", math.nan), ci.get("hi", math.nan)
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    return "DISAGREES" if lo > band or hi < -band else "agrees"


def prompts_needed(se: float, n: int, half_width: float = 0.05, z: float = Z95) -> int | None:
    """Prompts for a 95 % CI of the difference of half-width `half_width`, from its bootstrap SE at `n`
    prompts (the variance of a mean over prompts scales as 1/n). None when the SE is unknown."""
    if se is None or math.isnan(se) or n < 2:
        return None
    if se == 0:
        return n
    return max(2, math.ceil(n * (z * se / half_width) ** 2))


def vllm_per_prompt(per_request: list[dict | None] | None) -> dict[str, list[int]] | None:
    """vLLM's per-request spec-decode metrics as per-prompt counts: drafts (verification steps), drafted
    tokens, accepted tokens; None when vLLM gave none for some request."""
    if not per_request or any(r is None for r in per_request):
        return None
    hist = [r["acceptance_histogram"] for r in per_request]
    return {"drafts": [sum(h) for h in hist], "drafted": [int(r["num_draft_tokens"]) for r in per_request],
            "accepted": [sum(j * c for j, c in enumerate(h)) for h in hist]}
