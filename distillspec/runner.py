"""The entry point's body: compose specs from the Hydra config, validate, train and/or evaluate.

This is the only module (with run.py) that reads the Hydra config; everything it calls receives
typed specs and plain values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distillspec import constants as C
from distillspec.errors import ConfigError, check_choice, check_number
from distillspec.jsonio import write_json_atomic  # noqa: F401 - results are strict JSON (NaN -> null)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("distillspec")


def build(node: DictConfig, what: str) -> Any:
    """Instantiate a `_target_` node, surfacing our ConfigError (not Hydra's wrapper) for bad values."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise ConfigError(f"invalid settings for {what}: {cause}") from None
        raise


def local_rank() -> int:
    """This process's GPU index on its node: LOCAL_RANK (torchrun, Lightning's own launcher), else
    SLURM_LOCALID (srun, one task per GPU: multi-node DDP under SLURM), else 0."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def check_trainer_settings(trainer_cfg: DictConfig) -> None:
    """ConfigError for an unknown trainer.accelerator / precision / strategy name, before models load."""
    import typing

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    precisions = [str(v) for lit in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(lit)]
    valid = {"accelerator": ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())],
             "precision": precisions, "strategy": ["auto", *StrategyRegistry.available_strategies()]}
    for key, choices in valid.items():
        value = trainer_cfg.get(key)
        if value is not None and isinstance(value, (str, int)) and str(value) not in choices:
            raise ConfigError(f"unknown trainer.{key} {value!r}; valid choices: {', '.join(choices)}")


def resolve_device(accelerator: str) -> torch.device:
    """The device models load on for this process (Lightning's accelerator setting decides)."""
    import torch  # here, not at the top: settings are checked before torch's ~2 s import

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator!r} but CUDA is not available; use cpu or auto")
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def absolutize(path: str | None, base: Path) -> str | None:
    """Relative data paths in the config are relative to the launch directory."""
    if path is None:
        return None
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p).resolve())


def run(cfg: DictConfig, run_dir: Path, launch_dir: Path) -> dict[str, Any]:
    """Run the configured stage; returns what was written to run_dir/metrics.json.

    Every setting is checked before the heavy imports (Lightning, transformers' models: seconds), so a typo
    fails at once.
    """
    from distillspec.rundir import check_name, check_rerun, check_writable

    check_choice("stage", cfg.stage, C.STAGES)
    check_number("seed", cfg.seed, integer=True)
    check_name(cfg.name)
    snapshot = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    for key in ("path", "train_path"):
        if cfg.task.get(key) is not None:
            cfg.task[key] = absolutize(cfg.task[key], launch_dir)
    # 1. Every spec validates itself: bad input fails here, before any model or data is loaded.
    task = build(cfg.task, "task")
    pair = build(cfg.pair, "pair")
    sd = build(cfg.sd, "sd")
    objective = build(cfg.div, "div")
    rollout = build(cfg.rollout, "rollout")
    train = build(cfg.train, "train")
    if rollout.serves_teacher_logprobs() and cfg.stage in (C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL):
        from distillspec.rollout.served_teacher import check_loss_temperature

        check_loss_temperature(objective.temperature)
    training = cfg.stage in (C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL)
    from distillspec import teacherless

    teacherless.check_settings(rollout, objective, train, cfg.stage)  # teacher_location=server: no teacher here
    served = training and teacherless.serves_scores(rollout)
    if cfg.draft_checkpoint is not None:
        if training:
            raise ConfigError("draft_checkpoint is for stage=eval (evaluate a given draft); "
                              f"got stage={cfg.stage!r}")
        pair.draft = absolutize(cfg.draft_checkpoint, launch_dir) if Path(
            os.path.expanduser(cfg.draft_checkpoint)).exists() else cfg.draft_checkpoint
        pair.check_settings("draft_checkpoint")  # a missing path: refused before Lightning's import, too
    check_writable(run_dir)
    check_trainer_settings(cfg.trainer)  # the first Lightning import
    trainer_factory = build(cfg.trainer, "trainer")
    if cfg.stage == C.STAGE_PLAN or cfg.get("dry_run"):  # memory plan: nothing loaded, any machine
        from distillspec.planning import plan_run

        return plan_run(pair, task, train, sd, objective, rollout, cfg.trainer, run_dir,
                        cards=tuple(cfg.get("plan_cards") or ()))
    import lightning as L

    from distillspec.lit.train_loop import CHECKPOINT_DIR, LAST_CHECKPOINT

    # A rerun of a finished command reports its result; a changed config is refused (distillspec.rundir).
    finished = check_rerun(run_dir, snapshot, cfg.resume,
                           has_checkpoint=any((run_dir / CHECKPOINT_DIR).glob(Path(LAST_CHECKPOINT).stem + "*")))
    if finished is not None:
        log_summary(finished)
        return finished
    device = resolve_device(cfg.trainer.get("accelerator", "auto"))
    pair.validate(device)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # 2. Data: prompts encoded with the target's tokenizer (errors on empty sets before model loading).
    from distillspec.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(pair.target))
    eval_tokens = sd.max_new_tokens or task.max_new_tokens
    eval_items = task.encode(task.load("eval"), tokenizer, limit=sd.num_eval, seed=cfg.seed) \
        if cfg.stage != C.STAGE_TRAIN else []
    train_items = task.encode(task.load("train"), tokenizer, limit=train.num_train, seed=cfg.seed) \
        if training else []
    from distillspec.lit.train_loop import check_token_budgets

    check_token_budgets(pair, task, train, sd, rollout, train_items, eval_items)  # before models load or run

    # 3. Models, loggers (teacher_location=server: the draft only; the target is measured in a child process).
    models = teacherless.load_student(pair, device, train_items[0].input_ids) if served else pair.load(device)
    from distillspec.lit.loggers import build_loggers

    run_name = f"{cfg.name}/{run_dir.name}" if run_dir.name else str(cfg.name)
    wandb_cfg = OmegaConf.to_container(cfg.logger.wandb, resolve=True) if cfg.logger.get("wandb") else None
    loggers = build_loggers(run_dir, run_name=run_name, wandb=wandb_cfg,
                            config=OmegaConf.to_container(cfg, resolve=True))
    out: dict[str, Any] = {"stage": cfg.stage, "draft": pair.draft, "target": pair.target,
                           "task": type(task).__name__}
    phases: dict[str, float] = {}  # wall seconds per phase of this launch (logged at the end, in metrics.json)
    clock = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = round(now - clock, 1)
        clock = now

    # 4. The untrained draft on the same prompts, for the before/after comparison (train_eval only).
    before = None
    compare = cfg.stage == C.STAGE_TRAIN_EVAL and cfg.get("compare_untrained", False) and eval_items
    if compare and not served:  # teacher_location=server: after training, with pair.draft reloaded (step 6)
        before = untrained_eval(models, tokenizer, task, eval_items, sd, eval_tokens, cfg.seed, device, out)
        phase_done("untrained_eval")

    # 5. Train.
    if training:
        from distillspec.lit.train_loop import train_draft

        # the curve's prompts are all the eval prompts: the evaluations before and after training are its ends
        covers_eval = bool(eval_items) and train.eval_num >= len(eval_items)
        with served_teacher(rollout, pair, models, tokenizer, train_items, train, task, run_dir, cfg, device) as engine, \
                served_student(rollout, pair, tokenizer, train_items, train, task, run_dir, cfg, device) as student:
            summary = train_draft(models=models, task=task, train_items=train_items, eval_items=eval_items,
                                  objective=objective, rollout=rollout, train=train, sd=sd,
                                  trainer_factory=trainer_factory, loggers=loggers, run_dir=run_dir,
                                  seed=cfg.seed, resume=cfg.resume, eval_max_new_tokens=eval_tokens,
                                  initial_eval=before.metrics if before is not None and covers_eval else None,
                                  final_eval_follows=cfg.stage == C.STAGE_TRAIN_EVAL and covers_eval,
                                  engine=engine, student_engine=student)
        out["train"] = summary
        phase_done("training")  # teacher rollouts, steps, periodic evaluations, checkpoints
        if not summary.get("is_global_zero", True):
            return out  # other DDP ranks stop here; rank 0 evaluates and writes results

    # 6. Evaluate with batched SD.
    if served and cfg.stage != C.STAGE_TRAIN:  # the target is loaded now, once, for both evaluations
        teacherless.load_target(pair, models, device)
        phase_done("target_load")
        if compare:
            untrained = dataclasses.replace(models, draft=teacherless.load_untrained_draft(pair, device))
            before = untrained_eval(untrained, tokenizer, task, eval_items, sd, eval_tokens, cfg.seed, device, out)
            del untrained
            phase_done("untrained_eval")
    if cfg.stage != C.STAGE_TRAIN:
        report = evaluate(models, tokenizer, task, eval_items, sd, eval_tokens, cfg.seed, device, loggers,
                          step=(out.get("train") or {}).get("steps"))
        out["metrics"] = report.metrics
        history = (out.get("train") or {}).get("eval_history")
        if history is not None and train.eval_every and covers_eval and train.max_steps % train.eval_every == 0:
            point = {C.VAL_PREFIX + k: float(v) for k, v in report.metrics.items()}
            history.append({"step": out["train"]["steps"], **point})  # the last curve point (skipped in training)
            for lg in loggers:
                lg.log_metrics(point, step=out["train"]["steps"])
        out["entropy_bins"] = report.entropy_bins
        out["examples"] = report.examples
        write_json_atomic(run_dir / "per_example.json", report.per_example)
        if before is not None:
            write_before_after(out, report, run_dir)
        phase_done("final_eval")
    out["phase_seconds"] = phases
    write_json_atomic(run_dir / C.METRICS_FILE, out)
    for lg in loggers:
        lg.finalize("success")
    log.info("wrote %s", run_dir / C.METRICS_FILE)
    log_summary(out)
    if phases:
        log.info("phase times: %s", ", ".join(f"{k.replace('_', ' ')} {v / 60:.1f} min" for k, v in phases.items()))
    return out


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the trainer settings launch: devices (an int, a list, -1 / "auto": all GPUs) x num_nodes."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    elif devices in (-1, "-1", "auto"):
        import torch

        n = max(torch.cuda.device_count(), 1) if trainer_cfg.get("accelerator") != "cpu" else 1
    else:
        n = int(devices)
    return n * nodes


@contextlib.contextmanager
def served_teacher(rollout, pair, models, tokenizer, train_items, train, task, run_dir: Path, cfg: DictConfig,
                   device):
    """The rollout engine for training (distillspec.rollout.engine): None for rollout.engine=hf; for vllm, a
    served teacher checked against the configured target before any teacher data is made."""
    from distillspec.rollout.engine import rollout_engine, verify_served_teacher

    dtype = pair.target_dtype or pair.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    with rollout_engine(rollout, target=pair.target, dtype=dtype, run_dir=run_dir,
                        prompt_lens=[len(it.input_ids) for it in train_items],
                        max_new_tokens=train.max_new_tokens or task.max_new_tokens, seed=cfg.seed,
                        world_size=world_size(cfg.trainer),
                        verify=lambda client: verify_served_teacher(client, models.target, tokenizer,
                                                                    train_items[0].input_ids, pair.target)) as engine:
        yield engine


def served_student(rollout, pair, tokenizer, train_items, train, task, run_dir: Path, cfg: DictConfig, device):
    """The student's vLLM server for on-policy rollouts (distillspec.rollout.student_server), or None."""
    from distillspec.rollout.student_server import student_engine

    dtype = pair.dtype  # the draft's (target_dtype is the target's alone)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return student_engine(rollout, run_dir=run_dir, tokenizer=tokenizer, dtype=dtype,
                          prompt_lens=[len(it.input_ids) for it in train_items],
                          batch_prompts=train.batch_size * train.accumulate,
                          max_new_tokens=train.max_new_tokens or task.max_new_tokens, seed=cfg.seed,
                          world_size=world_size(cfg.trainer), lora_rank=train.lora_rank)


def log_summary(out: dict[str, Any]) -> None:
    """A few headline numbers: final SD metrics and, when training evaluated periodically, the curve."""
    keys = (C.ALPHA_TOK, C.ALPHA_EXPECTED, C.BLOCK_EFFICIENCY, C.SPEEDUP)
    metrics = out.get("metrics") or {}
    shown = {k: round(float(metrics[k]), 4) for k in keys if k in metrics}
    quality = {k: round(float(v), 4) for k, v in metrics.items()
               if k.startswith((C.QUALITY_PREFIX, C.DRAFT_QUALITY_PREFIX))}
    cut = metrics.get(C.ANSWER_CUT_FRACTION)
    if quality and cut is not None and cut > C.QUALITY_CUT_LIMIT:  # not a result: it measures the token cap
        log.info("task quality not shown (%s in metrics.json): %.0f %% of outputs were cut at the token cap "
                 "before their final answer; raise sd.max_new_tokens to measure it", ", ".join(quality), 100 * cut)
    else:
        shown.update(quality)
    if shown:
        log.info("%s draft=%s: %s", out["stage"], out["draft"], shown)
    for point in (out.get("train") or {}).get("eval_history", []):
        log.info("training step %s: %s=%.4f %s=%.4f", point["step"], C.ALPHA_TOK,
                 point.get(C.VAL_PREFIX + C.ALPHA_TOK, float("nan")), C.ALPHA_EXPECTED,
                 point.get(C.VAL_PREFIX + C.ALPHA_EXPECTED, float("nan")))


def write_before_after(out: dict[str, Any], report, run_dir: Path) -> None:
    """before_after.md (table with CIs) and before_after.png next to metrics.json; the table is also logged."""
    from distillspec.before_after import PLOT_FILE, TABLE_FILE, before_after_plot, before_after_table

    table = before_after_table(out["before"], {"metrics": report.metrics, "per_example": report.per_example})
    (run_dir / TABLE_FILE).write_text(table)
    history = (out.get("train") or {}).get("eval_history", [])
    before_after_plot(history, out["before"]["entropy_bins"], report.entropy_bins, run_dir / PLOT_FILE)
    log.info("before / after distillation (%s, %s):\n%s", run_dir / TABLE_FILE, run_dir / PLOT_FILE, table)


def untrained_eval(models, tokenizer, task, eval_items, sd, eval_tokens: int, seed: int, device, out: dict):
    """The untrained draft's SD evaluation for the before/after comparison, stored in out["before"]."""
    # acceptance only: the distilled draft's speed is the result; timing the untrained one (SD at ~1 token
    # per block, and the target-only rounds again) would cost minutes of the demo for a context number
    before = evaluate(models, tokenizer, task, eval_items,
                      dataclasses.replace(sd, measure_speedup=False, draft_quality=False), eval_tokens, seed, device,
                      desc="SD eval (untrained draft)")
    out["before"] = {"metrics": before.metrics, "entropy_bins": before.entropy_bins,
                     "per_example": before.per_example}
    log.info("untrained draft: %s=%.4f %s=%.4f", C.ALPHA_EXPECTED, before.metrics.get(C.ALPHA_EXPECTED, 0.0),
             C.ALPHA_TOK, before.metrics.get(C.ALPHA_TOK, 0.0))
    return before


def evaluate(models, tokenizer, task, items, sd, max_new_tokens: int, seed: int, device, loggers=(),
             step: int | None = None, desc: str = "SD eval"):
    """Batched SD evaluation of models.draft against models.sd_target on `items` (`SDEvaluator.run`, the path every
    evaluation takes); returns the EvalReport. `loggers` receive it (`lit.loggers.log_report`) at `step` (after
    training: its final step)."""
    from distillspec.evaluation import SDEvaluator

    evaluator = SDEvaluator(models.draft, models.sd_target, tokenizer, sd, task, items, max_new_tokens, seed)
    report = evaluator.run(device, desc=desc, leave=True)
    if loggers:
        from distillspec.lit.loggers import log_report

        log_report(loggers, report, step)
    return report
