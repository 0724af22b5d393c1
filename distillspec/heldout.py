"""A held-out acceptance measure that costs one draft forward pass per prompt batch, not speculative decoding.

alpha_heldout is the draft's expected acceptance (distillspec.acceptance) along stored target samples of
held-out prompts, teacher-forced: at every position of the target's own sample, sum_v min(p(v), q(v)) with p
and q both models' processed distributions at the SD setting (sd.temperature, sd.top_p; temperature 0: greedy).
SD's output is distributed as the target's samples, so this estimates SD's alpha_expected without running SD;
its 95 % CI resamples prompts.

The target's part is computed once: its samples and its top-k log-probs at the SD temperature, as a TeacherCache
(distillspec.rollout.teacher_cache) of the held-out prompts, kept in the teacher-data store (keyed by the prompts,
the settings, the seed and the target's weights), so a later run with the same target and prompts loads it. Each
evaluation of a draft is then one teacher-forced draft forward per batch. Exact where the target's nucleus lies
within the stored top HELDOUT_TOP_K tokens (HELDOUT_TRUNCATED: the fraction of positions where it does not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from distillspec import constants as C
from distillspec.acceptance import draft_processed_at, position_acceptance, prompt_sums, target_processed

log = logging.getLogger(__name__)

HELDOUT_TOP_K = 64  # target tokens stored per position: the nucleus of T 0.6, top-p 0.95 nearly always fits
SEED_OFFSET = 29  # the held-out samples' seed: seed * 1_000_003 + SEED_OFFSET (teacher data use + 17 + k)
ROWS_PER_CHUNK = 256  # positions mapped to full-vocabulary logits at a time


def heldout_cache(items: Sequence[Any], temperature: float, top_p: float, max_new_tokens: int, eos_ids: list[int],
                  pad_id: int):
    """The (unbuilt) TeacherCache of the held-out prompts `items` at the SD setting: target samples at
    (temperature, top_p), their top-k log-probs at `temperature` (1 when greedy)."""
    from distillspec.rollout.teacher_cache import TeacherCache

    return TeacherCache(items, "teacher", top_k=HELDOUT_TOP_K, temperature=temperature or 1.0,
                        sample_temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                        pad_id=pad_id)


def build_heldout(target, items: Sequence[Any], *, temperature: float, top_p: float, max_new_tokens: int,
                  eos_ids: list[int], pad_id: int, device, seed: int, batch_size: int = 8, store=None,
                  progress: bool = False, load_teacher=None):
    """The held-out target data: loaded from `store` (a teacher-data store dir) when a run with the same inputs
    stored it, else sampled from `target` (a model; or, for a ServedTarget, the model `load_teacher()` gives)."""
    cache = heldout_cache(items, temperature, top_p, max_new_tokens, eos_ids, pad_id)
    cache.build(target, device, seed * 1_000_003 + SEED_OFFSET, batch_size=batch_size, progress=progress, store=store,
                load_teacher=load_teacher)
    return cache


@dataclass
class HeldoutReport:
    """metrics: {ALPHA_HELDOUT, its CI bounds, HELDOUT_TRUNCATED, HELDOUT_TAIL_GAP, HELDOUT_POSITIONS};
    per_example: one {expected_accepted, num_positions} per prompt (the CI's parts)."""

    metrics: dict[str, float]
    per_example: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def measure(draft, cache, *, temperature: float, top_p: float, device, batch_size: int = 8) -> HeldoutReport:
    """alpha_heldout of `draft` along the samples of `cache` (build_heldout), with its bootstrap CI over prompts."""
    from distillspec.sd.metrics import bootstrap_ci

    from distillspec.evaluation import evaluation_mode

    num, den, truncated, gap = [], [], 0.0, 0.0
    with evaluation_mode(torch.device(device), draft):  # as every SD evaluation: eval mode, frozen, no autocast
        for start in range(0, len(cache.items), batch_size):
            roll = cache.rollout(list(range(start, min(start + batch_size, len(cache.items)))), device)
            alpha, complete, tail_gap = _batch_acceptance(draft, roll, temperature, top_p)
            mask = roll.completion_mask()
            n, d = prompt_sums(alpha, mask)
            num.append(n)
            den.append(d)
            truncated += float((~complete & mask).sum())
            gap += float((tail_gap * mask).sum())
    num_t, den_t = torch.cat(num), torch.cat(den)
    total = max(float(den_t.sum()), 1.0)
    lo, hi = bootstrap_ci(num_t.numpy(), den_t.numpy())
    metrics = {C.ALPHA_HELDOUT: float(num_t.sum()) / total, C.ALPHA_HELDOUT_LO: lo, C.ALPHA_HELDOUT_HI: hi,
               C.HELDOUT_TRUNCATED: truncated / total, C.HELDOUT_TAIL_GAP: gap / total,
               C.HELDOUT_POSITIONS: float(den_t.sum())}
    rows = [{"expected_accepted": float(a), "num_positions": float(b)} for a, b in zip(num_t, den_t)]
    return HeldoutReport(metrics, rows)


def _batch_acceptance(draft, roll, temperature: float, top_p: float):
    """(B, T) acceptance, (B, T) complete and (B, T) tail-gap bound (top_p = 1) of one SparseRollout batch; the
    draft's full-vocabulary logits exist for ROWS_PER_CHUNK positions at a time."""
    from distillspec.models.forward import completion_hidden, completion_logits, output_head

    if output_head(draft) is not None:
        x, head = completion_hidden(draft, roll)
    else:
        x, head = completion_logits(draft, roll), None
    B, T = x.shape[:2]
    flat = x.reshape(B * T, -1)
    idx = roll.topk_idx.reshape(B * T, -1)
    p, complete = target_processed(roll.topk_logp.reshape(B * T, -1), temperature, top_p)
    alpha = torch.empty(B * T, device=flat.device)
    gap = torch.zeros(B * T, device=flat.device)
    for i in range(0, B * T, ROWS_PER_CHUNK):
        rows = slice(i, i + ROWS_PER_CHUNK)
        logits = flat[rows] if head is None else head(flat[rows])
        q_at, q_tail = draft_processed_at(logits, idx[rows], temperature, top_p)
        alpha[rows] = position_acceptance(p[rows], q_at)
        if top_p >= 1.0 and temperature > 0:
            gap[rows] = torch.minimum((1.0 - p[rows].sum(-1)).clamp_min(0.0), q_tail)
    return alpha.view(B, T), complete.view(B, T), gap.view(B, T)


class HeldoutEvaluator:
    """The acceptance curve's evaluator on held-out target data (train.curve=heldout): `run` measures the
    draft's alpha_heldout on the data's prompts (the arguments of SDEvaluator.run)."""

    label = "held-out acceptance"  # its name in the training bar and log

    def __init__(self, draft, cache, *, temperature: float, top_p: float, batch_size: int = 8) -> None:
        self.draft, self.cache = draft, cache
        self.temperature, self.top_p, self.batch_size = temperature, top_p, batch_size

    def run(self, device=None, progress: bool = False, desc: str = "", leave: bool = False) -> HeldoutReport:
        device = device if device is not None else next(self.draft.parameters()).device
        report = measure(self.draft, self.cache, temperature=self.temperature, top_p=self.top_p, device=device,
                         batch_size=self.batch_size)
        log.info("%s: %s=%.4f [%.4f, %.4f]", desc or "held-out acceptance", C.ALPHA_HELDOUT,
                 report.metrics[C.ALPHA_HELDOUT], report.metrics[C.ALPHA_HELDOUT_LO],
                 report.metrics[C.ALPHA_HELDOUT_HI])
        return report
