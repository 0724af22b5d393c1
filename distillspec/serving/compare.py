"""Our engine's counts next to vLLM's counters: derived rates, the side-by-side table, agreement flags.

Pure Python (no torch, no vLLM): inputs are the JSON-able dicts `vllm_check` collects.

Conventions (both engines count one *draft* per verification call of a request):
  acceptance rate        = accepted drafted tokens / drafted tokens            (our alpha_tok)
  mean acceptance length = 1 + accepted drafted tokens / drafts                (vLLM's; our tau counts emitted
                           tokens per verification, so it is lower where EOS or the token cap cut a block)
  per position k         = drafts whose k-th drafted token was accepted / drafts
Block alignment: vLLM samples the first new token in its prefill step and drafts after it; our default
(`sd.first_token=draft`) drafts the first new token. `sd.first_token=prefill` is vLLM's alignment, under
which greedy counters can be compared exactly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

RATE_TOLERANCE = 0.05  # |vLLM - expected| above this (absolute, on an acceptance rate) is flagged
TIE_LOGIT_GAP = 1e-3   # a greedy mismatch whose top-2 target logits differ by less is a floating-point tie


def counts_summary(num_drafts: int, num_draft_tokens: int, num_accepted: int,
                   per_pos: Sequence[int]) -> dict[str, Any]:
    """Rates of one engine's counts (the same formulas for ours and vLLM's)."""
    d = max(num_drafts, 0)
    return {"num_drafts": int(num_drafts), "num_draft_tokens": int(num_draft_tokens),
            "num_accepted_tokens": int(num_accepted),
            "acceptance_rate": num_accepted / num_draft_tokens if num_draft_tokens else math.nan,
            "mean_acceptance_length": 1.0 + num_accepted / d if d else math.nan,
            "per_position": [x / d if d else math.nan for x in per_pos]}


def vllm_summary(run: dict[str, Any]) -> dict[str, Any]:
    """`counts_summary` of a vllm_runner output, plus its throughput."""
    c = run["counters"]
    out = counts_summary(c["num_drafts"], c["num_draft_tokens"], c["num_accepted_tokens"],
                         c["num_accepted_tokens_per_pos"])
    out["tokens_per_s"] = run["num_output_tokens"] / run["generate_s"] if run["generate_s"] > 0 else math.nan
    out["num_output_tokens"] = run["num_output_tokens"]
    return out


def iid_rate(alpha: float, gamma: int) -> float:
    """Expected accepted/drafted tokens when each position is accepted with probability alpha independently
    and drafting stops mattering at the first rejection: (a + a^2 + .. + a^gamma) / gamma."""
    if math.isnan(alpha):
        return math.nan
    return sum(alpha ** k for k in range(1, gamma + 1)) / gamma


def identical_rows(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> list[bool]:
    return [list(x) == list(y) for x, y in zip(a, b)]


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or of the shorter one's end); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def flag(observed: float, expected: float, tolerance: float = RATE_TOLERANCE) -> str:
    if math.isnan(observed) or math.isnan(expected):
        return "n/a"
    return "agrees" if abs(observed - expected) <= tolerance else "DISAGREES"


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def side_by_side(ours_run: dict, ours_aligned: dict, vllm: dict, gamma: int) -> list[tuple[str, str, str, str]]:
    """Rows (quantity, ours in the run's alignment, ours in vLLM's alignment, vLLM)."""
    rows = [("drafts (verification calls)", ours_run["num_drafts"], ours_aligned["num_drafts"], vllm["num_drafts"]),
            ("drafted tokens", ours_run["num_draft_tokens"], ours_aligned["num_draft_tokens"],
             vllm["num_draft_tokens"]),
            ("accepted drafted tokens", ours_run["num_accepted_tokens"], ours_aligned["num_accepted_tokens"],
             vllm["num_accepted_tokens"]),
            ("acceptance rate (accepted / drafted)", ours_run["acceptance_rate"], ours_aligned["acceptance_rate"],
             vllm["acceptance_rate"]),
            ("mean acceptance length (1 + acc/drafts)", ours_run["mean_acceptance_length"],
             ours_aligned["mean_acceptance_length"], vllm["mean_acceptance_length"]),
            ("τ (our emitted tokens / verification)", ours_run.get("tau"), ours_aligned.get("tau"), None)]
    for k in range(gamma):
        def at(s: dict) -> float:
            pp = s["per_position"]
            return pp[k] if k < len(pp) else math.nan
        rows.append((f"accepted at position {k + 1}", at(ours_run), at(ours_aligned), at(vllm)))
    return [(name, _f(a), _f(b), _f(c)) for name, a, b, c in rows]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def exact_counter_diffs(ours_aligned: dict, vllm: dict) -> dict[str, int]:
    """vLLM minus ours (vLLM's alignment) for each counter; all zeros when the counters agree exactly."""
    out = {k: int(vllm[k]) - int(ours_aligned[k]) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    a = [round(x * ours_aligned["num_drafts"]) for x in ours_aligned["per_position"]]
    b = [round(x * vllm["num_drafts"]) for x in vllm["per_position"]]
    out["per_position"] = [y - x for x, y in zip(a, b)]
    return out
