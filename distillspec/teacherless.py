"""Runs whose training process does not hold the target while it trains: the runner's part.

Two kinds of run train the draft without the target in this process:

  * rollout.teacher_location=server: the vLLM teacher server scores every training sequence (cached teacher
    data, and on-policy rollouts through `distillspec.rollout.served_scores`);
  * train.release_target=true: every training sequence comes from the teacher data (rollout=teacher / fixed,
    the sparse top-k teacher), made before training starts, from the teacher-data store when a run with the same
    inputs stored it, else by the target (loaded here, or served with rollout.engine=vllm), which is then dropped.

For both:

  * `check_settings`: what needs the target in this process during training is refused before anything loads;
  * `load_student`: the draft and the tokenizer are loaded here; the target is measured in a child process
    (`distillspec.rollout.target_probe`: its probe log-probs for the served-model check, weights fingerprint,
    logits dimension, EOS ids) and stands in `ModelPair.target` as a `ServedTarget`;
  * `TargetLoader`: the target loaded here only when data that is not stored must be computed, at most once, and
    released before training (`teacher_data`: the released run's teacher data);
  * during training the acceptance curve (train.eval_every > 0) either loads the target for each SD evaluation
    and drops it after (`LateTargetSDEvaluator`, released runs), or measures the held-out acceptance, which needs
    no target (train.curve=heldout, distillspec.heldout);
  * after training (stage=train_eval), the SD evaluations need the target: `load_target` loads it then (the
    teacher server is stopped by then), and `load_untrained_draft` reloads pair.draft for the untrained-draft
    comparison, which such a run makes after training instead of before, so the target is loaded once.
"""

from __future__ import annotations

import dataclasses
import logging

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.memory import release_freed

log = logging.getLogger(__name__)

NOT_LOADED = "teacher not loaded in this process (rollout.teacher_location=server): the vLLM teacher server scores " \
             "every training sequence"
RELEASED = "target released: training runs on the teacher data alone (train.release_target=true)"


def serves_scores(rollout) -> bool:
    """Whether this run's teacher is served (rollout.teacher_location=server)."""
    return rollout.teacher_location == C.TEACHER_SERVED


def holds_no_target(rollout, train) -> bool:
    """Whether the training process trains without the target (served scores, or train.release_target)."""
    return serves_scores(rollout) or train.release_target


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


def live_teacher_reason(rollout, objective) -> str | None:
    """Why training needs the target after the teacher data is made (released runs), or None."""
    live = [s for s in rollout.used_sources() if s not in ("teacher", "fixed")]
    if live:
        return f"rollout source(s) {', '.join(live)} are made during training"
    if rollout.cache_top_k == 0:
        return "rollout.cache_top_k=0 turns the teacher data off (the teacher scores every step)"
    if rollout.teacher_logits != "sparse":
        return f"rollout.teacher_logits={rollout.teacher_logits!r} scores every step with the teacher"
    return dense_teacher_reason(objective)


def check_settings(rollout, objective, train, stage: str) -> None:
    """ConfigError (before any model loads) for what a training process without the target cannot do."""
    if stage not in (C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL):
        return
    if train.release_target and not serves_scores(rollout) and (reason := live_teacher_reason(rollout, objective)):
        raise ConfigError(f"train.release_target=true trains on the teacher data alone, but {reason}; valid with "
                          "it: rollout=teacher or fixed (cache_top_k > 0, teacher_logits=sparse) with a plain "
                          "divergence (div=fkl, rkl, jsd, skl, srkl or tvd), or train.release_target=false")
    if not serves_scores(rollout):
        return
    reason = dense_teacher_reason(objective)
    if reason is not None:
        raise ConfigError(f"rollout.teacher_location=server gives the teacher's top-k log-probs only, but {reason} "
                          "(its full next-token distributions); valid with teacher_location=server: a plain "
                          "divergence (div=fkl, rkl, jsd, skl, srkl or tvd, no gate, block_weighting=none), or "
                          "rollout.teacher_location=process")
    if train.eval_every and stage == C.STAGE_TRAIN_EVAL and train.curve == "sd":
        raise ConfigError(f"train.eval_every={train.eval_every} with rollout.teacher_location=server: the periodic SD "
                          "evaluations during training verify with the target in this process, which "
                          "teacher_location=server never loads during training; valid: train.eval_every=0 (the "
                          "evaluations after training still run), train.curve=heldout (no target needed), or "
                          "rollout.teacher_location=process")


def load_student(pair, device, probe_ids, why: str = NOT_LOADED):
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
    log.info(why)
    return ModelPair(draft=draft, target=target, tokenizer=tokenizer, draft_name=pair.draft, target_name=pair.target)


def target_models(pair, device, verifier: bool = True):
    """(the target, the full-precision verifier or None) loaded here, frozen, as PairSpec.load loads them."""
    from distillspec.models.loading import load_model, resolve_model_path

    path = resolve_model_path(pair.target)
    target = load_model(path, dtype=pair.target_dtype or pair.dtype, quantization=pair.target_quantization,
                        device=device, trainable=False)
    full = load_model(path, dtype=pair.target_dtype or pair.dtype, device=device, trainable=False) \
        if verifier and pair.verify_full_precision else None
    return target, full


def load_target(pair, models, device) -> None:
    """After training: load the target (and the full-precision verifier, with pair.verify_full_precision) into
    `models` for the SD evaluations."""
    from distillspec.models.loading import check_same_vocab

    release_freed()  # training's optimizer state, gradients and graphs go (back to the OS) before the target comes
    log.info("training is done: loading the target for the SD evaluation")
    models.target, models.verifier = target_models(pair, device)
    check_same_vocab(models.draft, models.target, models.tokenizer, models.tokenizer, pair.draft, pair.target)


def load_untrained_draft(pair, device):
    """pair.draft as training started from it (same loading options), for the untrained-draft comparison."""
    from distillspec.models.loading import load_model, resolve_model_path

    return load_model(resolve_model_path(pair.draft), dtype=pair.dtype, device=device,
                      trainable=pair.draft_trainable, gradient_checkpointing=pair.gradient_checkpointing)


class TargetLoader:
    """The target, loaded in this process on the first call (for data that is not stored), at most once;
    `release` drops it. Passed to TeacherCache.build as `load_teacher`."""

    def __init__(self, pair, device) -> None:
        self.pair, self.device, self.model = pair, device, None

    def __call__(self):
        if self.model is None:
            log.info("loading the target to make data that is not stored")
            self.model, _ = target_models(self.pair, self.device, verifier=False)
        return self.model

    def release(self) -> None:
        if self.model is not None:
            self.model = None
            release_freed()
            log.info(RELEASED)


def teacher_data(rollout, models, items, *, device, seed: int, temperature: float, max_new_tokens: int,
                 engine, load_teacher) -> dict:
    """A released run's teacher data ({source: TeacherCache}), made before training as the training module would
    make it (same seeds, same store): from the store, the served teacher `engine`, or `load_teacher()`."""
    from distillspec.evaluation import eos_token_ids
    from distillspec.rollout.sources import RolloutSampler

    sampler = RolloutSampler(rollout, models.draft, models.target, eos_token_ids(models.tokenizer, models.target),
                             models.tokenizer.pad_token_id, max_new_tokens, engine=engine)
    sampler.build_caches(items, device, seed, temperature, load_teacher=load_teacher)
    return sampler.caches


class LateTargetSDEvaluator:
    """The acceptance curve's SD evaluations of a released run: each `run` loads the target, evaluates as
    train_draft's SD evaluator does (acceptance only, same prompts and seed), and drops the target after."""

    def __init__(self, pair, draft, tokenizer, sd, task, items, max_new_tokens: int, seed: int) -> None:
        self.pair, self.draft, self.tokenizer, self.task, self.items = pair, draft, tokenizer, task, items
        self.sd = dataclasses.replace(sd, measure_speedup=False, draft_quality=False)
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def run(self, device, progress: bool = False, desc: str = "", leave: bool = False):
        from distillspec.evaluation import SDEvaluator

        target, verifier = target_models(self.pair, device)
        evaluator = SDEvaluator(self.draft, verifier if verifier is not None else target, self.tokenizer, self.sd,
                                self.task, self.items, self.max_new_tokens, self.seed, speed_repeats=1)
        report = evaluator.run(device, progress=progress, desc=desc, leave=leave)
        del evaluator, target, verifier
        release_freed()
        return report
