"""Model forwards shared by training, the teacher cache and the benchmarks (below distillspec.rollout and
distillspec.lit, which both use them; imports torch only)."""

from __future__ import annotations

import torch

__all__ = ["completion_logits"]


def completion_logits(model, rollout) -> torch.Tensor:
    """(B, T, V) logits at the positions predicting completion tokens 0..T-1 (lm_head on those only).

    rollout: a distillspec.rollout.sequences.Rollout (or anything with input_ids (B, L+T), attention_mask
    (B, L+T) and completion_width T).
    """
    mask = rollout.attention_mask
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=False, logits_to_keep=rollout.completion_width + 1)
    return out.logits[:, :-1]
