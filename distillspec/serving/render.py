"""vllm_check.md: the check's result (`distillspec.serving.check`) as markdown. Pure Python."""

from __future__ import annotations

import json
import math

from distillspec.serving import compare as cmp


def _ci(ci) -> str:
    lo, hi = ci
    return "" if lo is None or math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]"


def _diff(d: dict) -> str:
    if not d or math.isnan(d.get("diff", math.nan)):
        return "–"
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def render(res: dict) -> str:
    """Settings, the side-by-side table, agreement lines, the T > 0 mode table, failed jobs, commands."""
    s, g = res["settings"], res["settings"]["gamma"]
    lines = [f"# vLLM check: {res['run_dir']}", "",
             f"vLLM {res['vllm_version']} ({res['platform']}); {s['num_prompts']} prompts x {s['max_new_tokens']} "
             f"tokens, T {s['temperature']}, top-p {s['top_p']}, γ {g}; draft `{s['draft']}`.", "",
             cmp.markdown_table(("quantity", f"ours (first_token={s['first_token']})", "ours (first_token=prefill, "
                                 "vLLM's alignment)", "vLLM"), res["table"]), ""]
    a = res["agreement"]
    if "identical_rows" in a:
        lines.append(f"- Greedy outputs token-identical to ours: {a['identical_rows']}/{s['num_prompts']} rows "
                     f"(vLLM target-only vs our SD: {a['identical_rows_target_only']}/{s['num_prompts']}).")
        for t in a.get("mismatches", []):
            lines.append(f"  - row {t['row']}: first difference at token {t['position']} (ours {t['ours']}, vLLM "
                         f"{t['vllm']}), our target's top-2 logit gap {t['top2_gap']:.2e}: "
                         + ("a floating-point tie" if t["tie"] else "NOT a tie"))
        d = a["counter_diffs"]
        lines.append("- Counters, vLLM minus ours in vLLM's alignment: " + (
            "all equal (drafts, drafted, accepted, every position)." if a["counters_equal"] else json.dumps(d)))
    if "vllm_mal" in a:
        lines.append(f"- Mean acceptance length: vLLM {a['vllm_mal']:.3f}, ours {a['ours_mal']:.3f} (relative "
                     f"difference {100 * a['mal_rel_diff']:+.1f} %); largest per-position difference "
                     f"{a['max_pos_diff']:.3f}.")
    lines.append(f"- Our recomputed evaluation matches the run's metrics.json (α_tok): {a['recomputed_matches_run']}.")
    sp = res["speed"]
    if sp.get("vllm_speedup") is not None:
        lines.append(f"- Throughput (vLLM, CPU, batch of {s['num_prompts']}): target alone "
                     f"{sp['vllm_target_tokens_per_s']:.1f} tok/s, with the draft {sp['vllm_sd_tokens_per_s']:.1f} "
                     f"tok/s: vLLM speedup {sp['vllm_speedup']:.2f}x (ours in metrics.json: "
                     + (f"{sp['ours_speedup']:.2f}x" if sp["ours_speedup"] is not None else "not measured") + ").")
    if res.get("modes"):
        lines += ["", "## T > 0: vLLM's draft sampling modes against exact rejection sampling", "",
                  cmp.markdown_table(("vLLM run", "draft", "vLLM acceptance rate [95 % CI]", "standard rejection "
                                      "sampling (ours, exact) [95 % CI]", "one-hot q scheme (predicted, i.i.d.)",
                                      "mode claims", "vLLM − claim [95 % CI]", "prompts for ±"
                                      f"{cmp.RATE_TOLERANCE}", "flag"),
                                     [(r["vllm_run"], r["draft"], cmp._f(r["vllm_rate"]) + _ci(r["vllm_ci"]),
                                       cmp._f(r["standard"]) + _ci(r["standard_ci"]),
                                       cmp._f(r["one_hot"]) + _ci(r["one_hot_ci"]), r["claims"], _diff(r["diff"]),
                                       cmp._f(r["prompts_needed"]), r["flag"]) for r in res["modes"]]), "",
                  "CIs: 95 % bootstrap over prompts (ours from our per-prompt counts, vLLM's from its per-request "
                  "spec-decode metrics); at T > 0 each engine samples its own trajectories, so their rates differ "
                  "by this noise even when both are exact. The flag compares vLLM with the scheme its mode claims "
                  "(paired bootstrap of the difference): DISAGREES only when the CI of the difference excludes 0 "
                  "(standard rejection sampling, exact) or lies beyond "
                  f"±{cmp.RATE_TOLERANCE} (the one-hot prediction, i.i.d. approximation). 'prompts for "
                  f"±{cmp.RATE_TOLERANCE}': how many prompts would make that CI ±{cmp.RATE_TOLERANCE} wide, "
                  "from this check's per-prompt variance. Standard rejection sampling accepts every drafted token "
                  "when the draft is the target (p = q); our engine is the exact reference and is not tuned "
                  "toward vLLM. The `_patched` rows rerun vLLM with its CPU fault fixed "
                  "(`tools/vllm_cpu_fault.py`: the rejection sampler's per-token temperatures are "
                  "uninitialised memory on the CPU build), which is the diagnosis: see docs/vllm-cpu-faults.md."
                  + (" At top-p < 1 vLLM's probabilistic q has no top-p (ours has), so those rows have no "
                     "expected value." if s["top_p"] < 1.0 else "")]
    if res.get("failed"):
        lines += ["", "## Failed vLLM jobs", ""]
        lines += [f"- `{tag}`: {f['reason']} (log: `{f['log']}`)" for tag, f in res["failed"].items()]
    lines += ["", "## Commands", "", "```bash", res["commands"]["check"], res["commands"]["serve"], "```", ""]
    return "\n".join(lines)
