"""Our side of the vLLM check: our SD engine on the run's prompts, counted the way vLLM counts.

Runs in the project environment (torch). `distillspec.serving.check` calls it before any vLLM job and frees
the models afterwards, so vLLM has the memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from distillspec import constants as C
from distillspec.serving import compare as cmp


def per_prompt_counts(result) -> dict[str, list]:
    """Per row of an SDResult: drafts (blocks), drafted tokens, accepted drafted tokens as vLLM counts them
    (every accepted verification outcome), and for the one-hot prediction the sum of p(argmax q) over the
    row's verified positions and their number. Each a list of length N rows."""
    n = result.lengths.shape[0]
    rows = result.trace_row.long()
    verified = result.trace_accepted | result.trace_first_rejected
    accepted = rows[result.trace_accepted].bincount(minlength=n)[:n]
    n_ver = rows[verified].bincount(minlength=n)[:n]
    greedy = torch.zeros(n, dtype=torch.float64).index_add_(0, rows[verified],
                                                              result.trace_p_draft_argmax[verified].double())
    return {"drafts": result.num_blocks.long().tolist(), "drafted": result.num_drafted.long().tolist(),
            "accepted": accepted.tolist(), "greedy_sum": greedy.tolist(), "verified": n_ver.tolist()}


def our_counts(result, gamma: int) -> dict[str, Any]:
    """compare.counts_summary of an SDResult plus tau and E[p(argmax q)]; outputs as token lists; per-prompt
    counts (`per_prompt_counts`) for the confidence intervals."""
    from distillspec.sd.metrics import sd_metrics

    m = sd_metrics(result, gamma)
    # counted from the trace (not rebuilt from the rates): blocks whose k-th drafted token was accepted
    per_pos = result.trace_pos[result.trace_accepted].long().bincount(minlength=gamma)[:gamma].tolist()
    # accepted as vLLM counts them: every verification outcome, also those EOS or the cap then cut
    out = cmp.counts_summary(int(result.num_blocks.sum()), int(result.num_drafted.sum()),
                             int(result.trace_accepted.sum()), per_pos)
    out.update(tau=m[C.BLOCK_EFFICIENCY], alpha_tok=m[C.ALPHA_TOK], num_accepted_emitted=int(result.num_accepted.sum()),
               alpha_expected=m[C.ALPHA_EXPECTED], alpha_greedy_draft=m[C.ALPHA_GREEDY_DRAFT],
               num_output_tokens=int(result.lengths.sum()), per_prompt=per_prompt_counts(result),
               outputs=[result.tokens[i, : int(result.lengths[i])].tolist() for i in range(result.lengths.shape[0])])
    return out


def run_ours(draft, target, tokenizer, task, items, sd, max_new: int, seed: int, first_token: str) -> dict:
    """Our SD on the run's prompts (same batches and seeds as its evaluation), rows in item order."""
    from distillspec.evaluation import SDEvaluator, concat_results

    spec = dataclasses.replace(sd, measure_speedup=False, draft_quality=False, compute_quality=False,
                               speed_warmup=False, first_token=first_token)
    ev = SDEvaluator(draft, target, tokenizer, spec, task, items, max_new, seed)
    outcomes = ev.outcomes(next(draft.parameters()).device, progress=False)
    result = concat_results([o.result for o in outcomes])
    order = [int(i) for i in torch.cat([o.index for o in outcomes]).argsort()]
    counts = our_counts(result, sd.gamma)
    counts["outputs"] = [counts["outputs"][i] for i in order]
    counts["per_prompt"] = {k: [v[i] for i in order] for k, v in counts["per_prompt"].items()}
    return counts


def tie_analysis(target, ids: list[int], ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """At the first differing token: our target's top-2 logit gap there and the two tokens' logits."""
    j = cmp.first_mismatch(ours, theirs)
    if j is None:
        return {}
    prefix = torch.tensor([ids + ours[:j]], device=next(target.parameters()).device)
    with torch.no_grad():
        logits = target(input_ids=prefix).logits[0, -1].float()
    top = logits.topk(2)
    a = ours[j] if j < len(ours) else None
    b = theirs[j] if j < len(theirs) else None
    gap = float(top.values[0] - top.values[1])
    return {"position": j, "ours": a, "vllm": b, "top2_gap": gap,
            "vllm_token_is_our_second": b is not None and int(top.indices[1]) == b,
            "tie": gap < cmp.TIE_LOGIT_GAP and b is not None and int(top.indices[1]) == b}
