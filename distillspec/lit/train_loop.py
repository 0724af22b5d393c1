"""Build and run the distillation Trainer: checkpoints (atomic, resumable), periodic SD eval, saved draft."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.specs import ObjectiveSpec, RolloutSpec, SDSpec, TrainSpec

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
DRAFT_DIR = "draft"


def apply_lora(model, rank: int):
    """Wrap the student with LoRA adapters on its attention/MLP projections (needs `peft`)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in the default install
        raise ConfigError("train.lora_rank > 0 needs peft: pip install 'distillspec[lora]'") from exc
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, cfg)


def context_limit(pair) -> tuple[int, str] | None:
    """(positions, model name): the smaller `max_position_embeddings` of a PairSpec's target and draft configs,
    read without loading weights; None when no config states one or none can be read (loading reports that)."""
    from transformers import AutoConfig

    from distillspec.models.loading import resolve_model_path

    limits = []
    for name in (pair.target, pair.draft):
        try:
            limit = getattr(AutoConfig.from_pretrained(resolve_model_path(name)), "max_position_embeddings", None)
        except (OSError, ValueError):
            continue
        if isinstance(limit, int) and limit > 0:
            limits.append((limit, name))
    return min(limits, key=lambda lim: lim[0]) if limits else None  # a tie names the target


def check_generation_fits(limit: tuple[int, str] | None, items: Sequence[Any], max_new_tokens: int, setting: str,
                          lookahead: int = 0, why: str = "") -> None:
    """ConfigError unless the longest prompt of `items` (`.input_ids`) + max_new_tokens + lookahead fits in
    `limit` (context_limit's answer). The message names `setting`, its value and the largest valid value."""
    if limit is None or not items:
        return
    positions, model = limit
    longest = max(len(it.input_ids) for it in items)
    most = positions - longest - lookahead
    if max_new_tokens > most:
        extra = f" + {lookahead} lookahead ({why})" if lookahead else ""
        valid = f"valid: {setting} <= {most}" if most >= 1 else "no value fits"
        raise ConfigError(f"{setting}={max_new_tokens} does not fit the context of {model!r} ({positions} positions):"
                          f" the longest prompt has {longest} tokens{extra}; {valid} (or shorten the prompts: "
                          "task.max_prompt_tokens)")


def check_token_budgets(pair, task, train: TrainSpec, sd: SDSpec, rollout: RolloutSpec, train_items: Sequence[Any],
                        eval_items: Sequence[Any]) -> None:
    """Before any model loads: each generation the run will make (training rollouts, SD evaluations) fits the
    models' context with its longest prompt; a ConfigError names the setting and its largest valid value."""
    from distillspec.evaluation import AUTO_GAMMA_MAX
    from distillspec.specs import AUTO_GAMMA

    if not train_items and not eval_items:
        return
    limit = context_limit(pair)
    skd = rollout.source == "skd"
    check_generation_fits(limit, train_items, train.max_new_tokens or task.max_new_tokens,
                          "train.max_new_tokens" if train.max_new_tokens else "task.max_new_tokens",
                          rollout.skd_gamma + 1 if skd else 0, "rollout.skd_gamma + 1")
    auto = sd.gamma == AUTO_GAMMA
    gamma = AUTO_GAMMA_MAX if auto else sd.gamma  # SD verifies gamma drafted tokens + 1 past the text so far
    check_generation_fits(limit, eval_items, sd.max_new_tokens or task.max_new_tokens,
                          "sd.max_new_tokens" if sd.max_new_tokens else "task.max_new_tokens", gamma + 1,
                          f"sd.gamma=auto may pick gamma {gamma}, + 1" if auto else "sd.gamma + 1")


def train_draft(*, models, task, train_items: Sequence[Any], eval_items: Sequence[Any], objective: ObjectiveSpec,
                rollout: RolloutSpec, train: TrainSpec, sd: SDSpec, trainer_factory, loggers, run_dir: Path,
                seed: int, resume: bool, eval_max_new_tokens: int,
                initial_eval: dict[str, float] | None = None, final_eval_follows: bool = False,
                engine=None, student_engine=None, teacher_caches: dict | None = None,
                evaluator=None) -> dict[str, Any]:
    """Distil `models.draft` towards `models.target`; returns a summary (steps, eval history, draft dir).

    The acceptance curve (`summary["eval_history"]`) is measured every train.eval_every steps on the first
    train.eval_num eval prompts. `initial_eval`: the untrained draft's metrics on those prompts, used as the
    step-0 point instead of re-measuring. `final_eval_follows`: the caller evaluates the trained draft on the
    same prompts right after training, so the periodic evaluation at the last step is skipped (the caller adds
    that point; see runner.run). `engine`: a served teacher that makes the teacher data (rollout.engine=vllm);
    `student_engine`: the student's vLLM server for on-policy rollouts (distillspec.rollout.student_server).
    `teacher_caches`: teacher data made before training ({source: TeacherCache}; distillspec.teacherless, whose runs
    hold no target: models.target is then a ServedTarget). `evaluator`: the curve's evaluator (an object with
    SDEvaluator's `run`) instead of SD on models.sd_target.

    Rerunning with the same run_dir resumes from run_dir/checkpoints/last.ckpt (step, optimizer, scheduler;
    data and RNG are functions of the step). The trained draft is saved (atomically) to run_dir/draft.
    """
    from distillspec.lit.data import IndexDataset
    from distillspec.lit.progress import quiet_lightning

    quiet_lightning()
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    check_fresh_start(last, resume)
    student = trainable_student(models.draft, train)
    module = distill_module(student, models, task, train_items, eval_items, objective, rollout, train, sd, seed,
                            eval_max_new_tokens, final_eval_follows, engine, student_engine, teacher_caches, evaluator)
    if initial_eval is not None and module.evaluator is not None:  # the untrained draft's evaluation: step 0
        module.eval_history = [{"step": 0, **{C.VAL_PREFIX + k: float(v) for k, v in initial_eval.items()}}]
    trainer = distill_trainer(trainer_factory, loggers, train, last.parent)
    resume_from = resume_point(trainer, last, run_dir / "csv" / "metrics.csv")
    # step ticks: each step picks its prompts from the step number (DistillModule.step_indices), not the loader
    loader = DataLoader(IndexDataset(train.max_steps), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_from)
    if trainer.global_step % train.checkpoint_every:  # the final step is checkpointed too
        trainer.save_checkpoint(last)
    summary = {"steps": int(trainer.global_step), "resumed_from": resume_from,
               "eval_history": module.eval_history, "is_global_zero": bool(trainer.is_global_zero)}
    if trainer.is_global_zero:
        models.draft = save_draft(student, models.tokenizer, run_dir / DRAFT_DIR)
        summary["draft_dir"] = str(run_dir / DRAFT_DIR)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return summary


def check_fresh_start(last: Path, resume: bool) -> None:
    """ConfigError when a checkpoint of an earlier attempt exists and resume=false (nothing is overwritten)."""
    from distillspec.lit.checkpoints import previous_path

    if (last.exists() or previous_path(last).exists()) and not resume:
        raise ConfigError(f"{last} exists and resume=false; rerun with resume=true to continue that run, "
                          "or pass name=<new name> to start a fresh one (nothing is overwritten)")


def trainable_student(draft, train: TrainSpec):
    """The draft as it trains: embeddings frozen (train.freeze_embeddings) and LoRA-wrapped (train.lora_rank)."""
    if train.freeze_embeddings:  # tied models: this freezes the output head too
        for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    return apply_lora(draft, train.lora_rank) if train.lora_rank else draft


def distill_module(student, models, task, train_items, eval_items, objective: ObjectiveSpec, rollout: RolloutSpec,
                   train: TrainSpec, sd: SDSpec, seed: int, eval_max_new_tokens: int, final_eval_follows: bool,
                   engine, student_engine, teacher_caches=None, evaluator=None):
    """The DistillModule: its rollout sampler built with the run's engines and teacher data made before training,
    its periodic evaluation's evaluator (`evaluator`, else SD on models.sd_target: `curve_evaluator`)."""
    from distillspec.evaluation import eos_token_ids
    from distillspec.lit.train_module import DistillModule
    from distillspec.rollout.sources import RolloutSampler
    from distillspec.rollout.target_probe import ServedTarget

    tokenizer = models.tokenizer
    eos_ids = eos_token_ids(tokenizer, models.target)
    max_new = train.max_new_tokens or task.max_new_tokens
    served = rollout.teacher_location == C.TEACHER_SERVED
    loaded = not isinstance(models.target, ServedTarget)  # a ServedTarget is measured, not loaded here
    teacher_scores = None
    if served:  # the teacher server scores the on-policy rollouts; models.target names its weights (store key)
        from distillspec.rollout.served_scores import ServedScores
        from distillspec.rollout.target_probe import logits_dim

        teacher_scores = ServedScores(engine, min(rollout.cache_top_k, logits_dim(models.target)))
    sampler = RolloutSampler(rollout, student, models.target, eos_ids, tokenizer.pad_token_id, max_new,
                             engine=engine, student_engine=student_engine, teacher_scores=teacher_scores,
                             caches=teacher_caches)
    if evaluator is None:
        evaluator = curve_evaluator(student, models, task, eval_items, train, sd, seed, eval_max_new_tokens)
    return DistillModule(student, models.target if loaded else None, train_items, objective, rollout, train, eos_ids,
                         tokenizer.pad_token_id, max_new, seed,
                         evaluator=evaluator,
                         skip_eval_at=train.max_steps if final_eval_follows else None, sampler=sampler)


def curve_evaluator(student, models, task, eval_items, train: TrainSpec, sd: SDSpec, seed: int,
                    eval_max_new_tokens: int):
    """The SDEvaluator of the acceptance curve on the first train.eval_num eval prompts, or None when training
    does not evaluate (train.eval_every=0 or no eval prompts)."""
    from distillspec.evaluation import SDEvaluator

    if not (train.eval_every and eval_items):
        return None
    # The acceptance curve needs acceptance only: no target-only timing, no draft-only decoding.
    curve_sd = dataclasses.replace(sd, measure_speedup=False, draft_quality=False)
    return SDEvaluator(student, models.sd_target, models.tokenizer, curve_sd, task, list(eval_items[: train.eval_num]),
                       eval_max_new_tokens, seed, speed_repeats=1)


def distill_trainer(trainer_factory, loggers, train: TrainSpec, ckpt_dir: Path):
    """The training Trainer: atomic checkpoints every train.checkpoint_every steps (and last.ckpt), the step bar."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from distillspec.lit.checkpoints import AtomicCheckpointIO
    from distillspec.lit.progress import progress_callbacks

    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=train.checkpoint_every, save_last=True, save_top_k=0)
    return trainer_factory(logger=loggers, max_steps=train.max_steps,
                           callbacks=[checkpoint, *progress_callbacks(trainer_factory)],
                           use_distributed_sampler=False, log_every_n_steps=train.log_every,
                           num_sanity_val_steps=0, enable_model_summary=False, plugins=[AtomicCheckpointIO()])


def resume_point(trainer, last: Path, csv_log: Path) -> str | None:
    """The checkpoint training resumes from (None: step 0), with the CSV log's rows of redone steps dropped."""
    from distillspec.lit.checkpoints import find_resume_checkpoint
    from distillspec.lit.loggers import reset_csv_for_start_over, trim_csv_for_resume

    # each rank checks for itself (no process group yet); only rank 0 moves damaged files aside
    found = find_resume_checkpoint(last, repair=trainer.is_global_zero)
    if found:
        log.info("resuming from %s (step %d)", found[0], found[1])
        if trainer.is_global_zero:
            trim_csv_for_resume(csv_log, found[1])  # steps from here on are redone
    elif trainer.is_global_zero and (dropped := reset_csv_for_start_over(csv_log)):
        log.warning("training starts from step 0: dropped %d row(s) of %s logged by an earlier attempt", dropped,
                    csv_log)
    return str(found[0]) if found else None


def save_draft(student, tokenizer, draft_dir: Path):
    """Save the trained draft (LoRA adapters folded into the weights) atomically; returns that model."""
    from distillspec.lit.train_module import save_hf_atomic

    if hasattr(student, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        student = student.merge_and_unload()
    save_hf_atomic(student, tokenizer, draft_dir)
    return student
