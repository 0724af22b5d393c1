"""Our engine's counts next to vLLM's counters: derived rates, the side-by-side table, agreement flags.

Pure Python (no torch, no vLLM): inputs are the JSON-able dicts `distillspec.serving.check` collects.
Sampling noise (CIs over prompts, the flag at T > 0) is in `distillspec.serving.stats`.

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

from distillspec.serving import stats

RATE_TOLERANCE = 0.05  # an approximate prediction (one-hot, i.i.d.) may miss by this much; also the resolution
                       # (CI half-width) the check reports the needed prompts for
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
    """`counts_summary` of a vllm_runner output, plus its throughput and per-prompt counts (None when vLLM
    gave none); a failed job stays {"failed": True, "reason", "log"}."""
    if run.get("failed"):
        return dict(run)
    c = run["counters"]
    out = counts_summary(c["num_drafts"], c["num_draft_tokens"], c["num_accepted_tokens"],
                         c["num_accepted_tokens_per_pos"])
    out["tokens_per_s"] = run["num_output_tokens"] / run["generate_s"] if run["generate_s"] > 0 else math.nan
    out["num_output_tokens"] = run["num_output_tokens"]
    out["per_prompt"] = stats.vllm_per_prompt(run.get("per_request"))
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


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def side_by_side(ours_run: dict, ours_aligned: dict, vllm: dict, gamma: int) -> list[tuple[str, str, str, str]]:
    """Rows (quantity, ours in the run's alignment, ours in vLLM's alignment, vLLM); the acceptance rates with
    their 95 % bootstrap CIs over prompts. A failed vLLM job leaves its column "FAILED", one not run
    ({"skipped": True}: --rows) "not run"."""
    failed = "FAILED" if vllm.get("failed") else "not run" if vllm.get("skipped") else None
    v = {} if failed else vllm
    rows = [("drafts (verification calls)", ours_run["num_drafts"], ours_aligned["num_drafts"], v.get("num_drafts")),
            ("drafted tokens", ours_run["num_draft_tokens"], ours_aligned["num_draft_tokens"],
             v.get("num_draft_tokens")),
            ("accepted drafted tokens", ours_run["num_accepted_tokens"], ours_aligned["num_accepted_tokens"],
             v.get("num_accepted_tokens")),
            ("acceptance rate (accepted / drafted) [95 % CI over prompts]",
             *(with_ci(s["acceptance_rate"], rate_ci(s)) for s in (ours_run, ours_aligned)),
             with_ci(v["acceptance_rate"], rate_ci(v)) if v else None),
            ("mean acceptance length (1 + acc/drafts)", ours_run["mean_acceptance_length"],
             ours_aligned["mean_acceptance_length"], v.get("mean_acceptance_length")),
            ("τ (our emitted tokens / verification)", ours_run.get("tau"), ours_aligned.get("tau"), None)]
    for k in range(gamma):
        def at(s: dict) -> float:
            pp = s.get("per_position") or []
            return pp[k] if k < len(pp) else math.nan
        rows.append((f"accepted at position {k + 1}", at(ours_run), at(ours_aligned), at(v)))
    return [(name, _f(a), _f(b), failed or _f(c)) for name, a, b, c in rows]


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


def rate_ci(s: dict) -> tuple[float, float]:
    """95 % bootstrap CI over prompts of an engine summary's acceptance rate (nan without per-prompt counts)."""
    pp = s.get("per_prompt")
    return stats.ratio_ci(pp["accepted"], pp["drafted"]) if pp else (math.nan, math.nan)


def with_ci(x: float, ci: tuple[float, float]) -> str:
    """"0.215 [0.190, 0.241]" (the CI left out when unknown)."""
    return _f(x) + ("" if math.isnan(ci[0]) else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


MODE_ROWS = (("draft_default", "aligned", "one-hot"), ("draft_probabilistic", "aligned", "standard"),
             ("draft_probabilistic_patched", "aligned", "standard"), ("self_greedy", "self", "one-hot"),
             ("self_probabilistic", "self", "standard"), ("self_probabilistic_patched", "self", "standard"))


def mode_rows(ours: dict[str, dict], vllm: dict[str, dict], gamma: int, top_p: float = 1.0) -> list[dict[str, Any]]:
    """T > 0: each vLLM sampling mode's acceptance rate beside what each verification scheme should give.

    ours: {"aligned": our run in vLLM's alignment, "self": draft = target}, each with per-prompt counts.
    standard = our exact rejection sampling (measured: our acceptance rate under vLLM's alignment; 1 for
    draft = target). one-hot = argmax drafts verified with q taken as one-hot: predicted from our
    E[p(argmax q)] at the same positions with i.i.d. acceptance. vLLM's "greedy" mode claims the one-hot
    scheme, its "probabilistic" mode the standard one. The flag is noise-aware (`stats`): the 95 % CI over
    prompts of vLLM minus the claim (paired bootstrap) must exclude 0 for the exact standard scheme, and
    ±RATE_TOLERANCE for the approximate one-hot prediction. vLLM's probabilistic q ignores top-p/top-k on
    the draft side, so at top_p < 1 it is not our q: no flag then. A failed vLLM job is a FAILED row.
    """
    rows = []
    for tag, side, claim in MODE_ROWS:
        if tag not in vllm or side not in ours:
            continue
        o, v = ours[side], vllm[tag]
        pp = o["per_prompt"]
        standard, onehot = o["acceptance_rate"], iid_rate(o["alpha_greedy_draft"], gamma)
        row = {"vllm_run": tag, "draft": "target itself" if tag.startswith("self") else "run's draft",
               "standard": standard, "standard_ci": stats.ratio_ci(pp["accepted"], pp["drafted"]),
               "one_hot": onehot, "one_hot_ci": tuple(iid_rate(x, gamma) if not math.isnan(x) else math.nan
                                                        for x in stats.ratio_ci(pp["greedy_sum"], pp["verified"])),
               "claims": claim}
        if v.get("failed"):
            rows.append(dict(row, vllm_rate=math.nan, vllm_ci=(math.nan, math.nan), expected=math.nan,
                             diff={}, prompts_needed=None, flag="FAILED", reason=v["reason"], log=v["log"]))
            continue
        vp = v.get("per_prompt")
        if claim == "one-hot":
            expected, band = onehot, RATE_TOLERANCE
            b, fb = (pp["greedy_sum"], pp["verified"]), (lambda a: sum(a ** k for k in range(1, gamma + 1)) / gamma)
        else:
            expected, band = (standard if top_p >= 1.0 else math.nan), 0.0
            b, fb = (pp["accepted"], pp["drafted"]), None
        diff = stats.diff_ci((vp["accepted"], vp["drafted"]), b, fb) if vp and not math.isnan(expected) else {}
        rows.append(dict(row, vllm_rate=v["acceptance_rate"], vllm_ci=rate_ci(v), expected=expected, diff=diff,
                         prompts_needed=stats.prompts_needed(diff.get("se", math.nan), len(pp["drafted"]),
                                                             RATE_TOLERANCE),
                         flag=stats.flag_ci(diff, band) if diff else "n/a"))
    return rows
