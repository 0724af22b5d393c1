"""Model forwards shared by training, the teacher cache, the held-out acceptance measure and the benchmarks
(below distillspec.rollout and distillspec.lit, which both use them; imports torch only).

`completion_logits` returns the (B, T, V) logits at the completion positions. `completion_hidden` stops before the
output head: it returns the (B, T, H) final hidden states and the head as a function, so a loss can map C rows at a
time to logits (distillspec.losses.sparse) and the (B, T, V) logits, their log-softmax and their gradient never
exist for all positions at once (V = 151,936 for Qwen2.5: 0.6 GB per float32 copy at 4 x 256 positions).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["completion_hidden", "completion_logits", "completion_outputs", "output_head"]

# Configs whose models change the logits after the output head (soft-capping, scaling): `output_head` refuses them.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _positions(rollout) -> torch.Tensor:
    """(B, L+T) position ids of a left-padded rollout (0 at each row's first real token)."""
    return (rollout.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(model, rollout) -> torch.Tensor:
    """(B, T, V) logits at the positions predicting completion tokens 0..T-1 (lm_head on those only).

    rollout: a distillspec.rollout.sequences.Rollout (or anything with input_ids (B, L+T), attention_mask
    (B, L+T) and completion_width T).
    """
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=_positions(rollout),
                use_cache=False, logits_to_keep=rollout.completion_width + 1)
    return out.logits[:, :-1]


def output_head(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from final hidden states (..., H) to logits (..., V) of a causal LM whose logits are its output
    head applied to its decoder's output, or None for a model that changes them further (see _HEAD_EXTRAS)."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1.0) for name in _HEAD_EXTRAS):
        return None
    return model.get_output_embeddings()


def completion_hidden(model, rollout) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """((B, T, H) final hidden states at the positions predicting completion tokens 0..T-1, the output head (C, H)
    -> (C, V)): `head(hidden)` equals completion_logits(model, rollout). ValueError for a model whose logits are
    not its head's output (output_head is None: use completion_logits)."""
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} changes its logits after the output head; use completion_logits")
    out = model.get_decoder()(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                              position_ids=_positions(rollout), use_cache=False)
    width = rollout.completion_width
    return out.last_hidden_state[:, -(width + 1):-1], head


def completion_outputs(model, rollout, rows: int, chunk_size: int | None) -> tuple[torch.Tensor, Callable | None]:
    """What a chunked loss takes from `model` for `rows` positions of `rollout`: (B, T, H) hidden states and the
    output head when the positions span more than one chunk of chunk_size rows (and the model allows it:
    output_head), else (B, T, V) logits and None (one chunk: the full logits cost no more than a chunk's)."""
    if chunk_size is not None and rows > chunk_size and output_head(model) is not None:
        return completion_hidden(model, rollout)
    return completion_logits(model, rollout), None
