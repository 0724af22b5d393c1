"""A run whose training process never loads the teacher (rollout.teacher_location=server): the runner's part.

The vLLM teacher server scores every training sequence (cached teacher data, and on-policy rollouts through
`distillspec.rollout.served_scores`), so training needs the student only:

  * `check_settings`: what needs the teacher in this process during training is refused before anything loads
    (an objective that needs its full distributions; the periodic SD evaluations);
  * `load_student`: the draft and the tokenizer are loaded here; the target is measured in a child process
    (`distillspec.rollout.target_probe`: its probe log-probs for the served-model check, weights fingerprint,
    logits dimension, EOS ids) and stands in `ModelPair.target` as a `ServedTarget`;
  * after training (stage=train_eval), the SD evaluations need the target: `load_target` loads it then (the
    teacher server is stopped by then), and `load_untrained_draft` reloads pair.draft for the untrained-draft
    comparison, which such a run makes after training instead of before, so the target is loaded once.
"""

from __future__ import annotations

import logging

from distillspec import constants as C
from distillspec.errors import ConfigError

log = logging.getLogger(__name__)

NOT_LOADED = "teacher not loaded in this process (rollout.teacher_location=server): the vLLM teacher server scores " \
             "every training sequence"


def serves_scores(rollout) -> bool:
    """Whether this run's teacher is served (rollout.teacher_location=server)."""
    return rollout.teacher_location == C.TEACHER_SERVED


def dense_teacher_reason(objective) -> str | None:
    """The setting that makes `objective` need the teacher's full distributions (ObjectiveSpec.needs_dense_teacher),
    or None."""
    if objective.gate is not None:
        return "div.gate (the SpecKD gate: div=speckd) needs the teacher's top-k membership of every proposal"
    if objective.divergence == "adaptive":
        return "div.divergence='adaptive' needs the teacher's per-token entropy"
    if objective.block_weighting != "none":
        return f"div.block_weighting={objective.block_weighting!r} needs the teacher's per-position 1 - TV"
    return None


def check_settings(rollout, objective, train, stage: str) -> None:
    """ConfigError (before any model loads) for what a training process without the teacher cannot do."""
    if not serves_scores(rollout) or stage not in (C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL):
        return
    reason = dense_teacher_reason(objective)
    if reason is not None:
        raise ConfigError(f"rollout.teacher_location=server gives the teacher's top-k log-probs only, but {reason} "
                          "(its full next-token distributions); valid with teacher_location=server: a plain "
                          "divergence (div=fkl, rkl, jsd, skl, srkl or tvd, no gate, block_weighting=none), or "
                          "rollout.teacher_location=process")
    if train.eval_every and stage == C.STAGE_TRAIN_EVAL:
        raise ConfigError(f"train.eval_every={train.eval_every} with rollout.teacher_location=server: the periodic SD "
                          "evaluations during training verify with the target in this process, which "
                          "teacher_location=server never loads during training; valid: train.eval_every=0 (the "
                          "evaluations after training still run), or rollout.teacher_location=process")


def load_student(pair, device, probe_ids):
    """A ModelPair whose draft and tokenizer are loaded here and whose target is a ServedTarget measured in a
    child process (its log-probs of `probe_ids`, a training prompt). ConfigError when the vocabularies differ."""
    from distillspec.models.loading import ModelPair, check_same_vocab, load_model, load_tokenizer, logits_dim, \
        resolve_model_path
    from distillspec.rollout.target_probe import describe_target

    pair.validate(device)
    target_path, draft_path = resolve_model_path(pair.target), resolve_model_path(pair.draft)
    tokenizer, draft_tokenizer = load_tokenizer(target_path), load_tokenizer(draft_path)
    target = describe_target(target_path, dtype=pair.target_dtype or pair.dtype, quantization=pair.target_quantization,
                             device=str(device), probe_ids=probe_ids)
    draft = load_model(draft_path, dtype=pair.dtype, device=device, trainable=pair.draft_trainable,
                       gradient_checkpointing=pair.gradient_checkpointing)
    if logits_dim(draft) != target.logits_dim:
        raise ConfigError(f"draft and target have different vocabulary sizes (draft {pair.draft!r}: logits dim "
                          f"{logits_dim(draft)}; target {pair.target!r}: logits dim {target.logits_dim})")
    check_same_vocab(draft, draft, draft_tokenizer, tokenizer, pair.draft, pair.target)  # the tokenizers (same dims)
    log.info(NOT_LOADED)
    return ModelPair(draft=draft, target=target, tokenizer=tokenizer, draft_name=pair.draft, target_name=pair.target)


def load_target(pair, models, device) -> None:
    """After training: load the target (and the full-precision verifier, with pair.verify_full_precision) into
    `models` for the SD evaluations."""
    from distillspec.models.loading import check_same_vocab, load_model, resolve_model_path

    path = resolve_model_path(pair.target)
    log.info("training is done: loading the target for the SD evaluation")
    models.target = load_model(path, dtype=pair.target_dtype or pair.dtype, quantization=pair.target_quantization,
                               device=device, trainable=False)
    check_same_vocab(models.draft, models.target, models.tokenizer, models.tokenizer, pair.draft, pair.target)
    if pair.verify_full_precision:
        models.verifier = load_model(path, dtype=pair.target_dtype or pair.dtype, device=device, trainable=False)


def load_untrained_draft(pair, device):
    """pair.draft as training started from it (same loading options), for the untrained-draft comparison."""
    from distillspec.models.loading import load_model, resolve_model_path

    return load_model(resolve_model_path(pair.draft), dtype=pair.dtype, device=device,
                      trainable=pair.draft_trainable, gradient_checkpointing=pair.gradient_checkpointing)
