"""The entry point's body: compose specs from the Hydra config, validate, train and/or evaluate.

This is the only module (with run.py) that reads the Hydra config; everything it calls receives
typed specs and plain values.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distillspec import constants as C
from distillspec.errors import ConfigError, check_choice, check_number
from distillspec.jsonio import write_json_atomic  # results are strict JSON (NaN -> null)
from distillspec.memory import release_freed, reset_peak
from distillspec.run_phases import Data, PhaseClock, Settings, curve_covers_eval, load_data, load_models, train_phase

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

    Phases: validate (every setting, before the heavy imports: a typo fails at once), plan (stage=plan), the
    rerun check (a finished command reports its result), data, models, the untrained draft's evaluation,
    training, the final evaluation, results. A run whose training process does not hold the target while it
    trains (rollout.teacher_location=server, or train.release_target: distillspec.teacherless) loads it after
    training and evaluates the untrained draft then.
    """
    s = validate(cfg, run_dir, launch_dir)
    if cfg.stage == C.STAGE_PLAN or cfg.get("dry_run"):  # memory plan: nothing loaded, any machine
        from distillspec.planning import plan_run

        return plan_run(s.pair, s.task, s.train, s.sd, s.objective, s.rollout, cfg.trainer, run_dir,
                        cards=tuple(cfg.get("plan_cards") or ()))
    finished = finished_result(run_dir, s.snapshot, s.resume)
    if finished is not None:
        log_summary(finished)
        return finished
    release_freed()  # what an earlier job of this multirun (one process) freed, back to the OS
    reset_peak()  # this job's own peak memory, also within a multirun's one process
    device = prepare_device(cfg, s)
    data = load_data(s)
    models = load_models(s, data, device)
    loggers = make_loggers(cfg, run_dir)
    out: dict[str, Any] = {"stage": s.stage, "draft": s.pair.draft, "target": s.pair.target,
                           "task": type(s.task).__name__}
    if cfg.draft_checkpoint is not None:
        out.update(trained_by(s.pair.draft))
    clock = PhaseClock()
    before = None
    if s.compare_untrained and data.eval_items and not s.late:  # late: after training, with the target
        before = untrained_eval(models, data.tokenizer, s.task, data.eval_items, s.sd, data.eval_tokens, s.seed,
                                device, out)
        clock.done("untrained_eval")
    if s.training:
        out["train"] = train_phase(s, data, models, loggers, run_dir, device, before, clock)
        clock.done("training")  # teacher rollouts, steps, periodic evaluations, checkpoints
        if not out["train"].get("is_global_zero", True):
            return out  # other DDP ranks stop here; rank 0 evaluates and writes results
    if s.stage != C.STAGE_TRAIN:
        if s.late:
            before = late_target(s, data, models, device, out, clock)
        final_eval(s, data, models, device, loggers, run_dir, out, before)
        clock.done("final_eval")
    result = write_results(out, clock, run_dir, loggers)
    if s.training and not s.train.keep_checkpoints:  # finished: a rerun reports metrics.json, nothing resumes
        drop_checkpoints(run_dir)
    return result


def drop_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's training checkpoints (train.keep_checkpoints=false); its draft/ stays."""
    import shutil

    from distillspec.lit.train_loop import CHECKPOINT_DIR

    ckpt_dir = run_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        size = sum(p.stat().st_size for p in ckpt_dir.iterdir() if p.is_file())
        shutil.rmtree(ckpt_dir)
        log.info("deleted %s (%.1f GB; train.keep_checkpoints=false)", ckpt_dir, size / 1e9)


def validate(cfg: DictConfig, run_dir: Path, launch_dir: Path) -> Settings:
    """Every spec validates itself: bad input fails here, before any model or data is loaded (and before
    Lightning's import, but for the trainer settings' check, the last)."""
    from distillspec import teacherless
    from distillspec.rundir import check_name, check_writable

    check_choice("stage", cfg.stage, C.STAGES)
    check_number("seed", cfg.seed, integer=True)
    check_name(cfg.name)
    snapshot = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    for key in ("path", "train_path"):
        if cfg.task.get(key) is not None:
            cfg.task[key] = absolutize(cfg.task[key], launch_dir)
    s = Settings(stage=cfg.stage, seed=cfg.seed, resume=cfg.resume, snapshot=snapshot,
                 compare_untrained=cfg.stage == C.STAGE_TRAIN_EVAL and bool(cfg.get("compare_untrained", False)),
                 task=build(cfg.task, "task"), pair=build(cfg.pair, "pair"), sd=build(cfg.sd, "sd"),
                 objective=build(cfg.div, "div"), rollout=build(cfg.rollout, "rollout"), train=build(cfg.train, "train"))
    if s.rollout.serves_teacher_logprobs() and s.training:
        from distillspec.rollout.served_teacher import check_loss_temperature

        check_loss_temperature(s.objective.temperature)
    teacherless.check_settings(s.rollout, s.objective, s.train, s.stage)  # teacher_location=server: no teacher here
    if cfg.draft_checkpoint is not None:
        if s.training:
            raise ConfigError(f"draft_checkpoint is for stage=eval (evaluate a given draft); got stage={s.stage!r}")
        s.pair.draft = absolutize(cfg.draft_checkpoint, launch_dir) if Path(
            os.path.expanduser(cfg.draft_checkpoint)).exists() else cfg.draft_checkpoint
        s.pair.check_settings("draft_checkpoint")  # a missing path: refused before Lightning's import, too
    check_writable(run_dir)
    check_trainer_settings(cfg.trainer)  # the first Lightning import
    s.trainer_factory = build(cfg.trainer, "trainer")
    return s


def trained_by(draft: str) -> dict[str, Any]:
    """{TRAINED_BY: {"method", "draft"}} of the finished run whose draft/ `draft` is (the report's label for an
    evaluation of it, kept with the result: distillspec.report_jobs), else {}; a damaged run is skipped in a line."""
    from distillspec.jsonio import DamagedFileError
    from distillspec.report_jobs import trained_origin

    try:
        origin = trained_origin(draft)
    except DamagedFileError as err:
        log.warning("the report will not name the run that trained this draft: %s", err)
        return {}
    return {} if origin is None else {C.TRAINED_BY: {"method": origin[0], "draft": origin[1]}}


def finished_result(run_dir: Path, snapshot: dict, resume: bool) -> dict[str, Any] | None:
    """A rerun of a finished command: its result; a changed config is refused (distillspec.rundir)."""
    from distillspec.lit.train_loop import CHECKPOINT_DIR, LAST_CHECKPOINT
    from distillspec.rundir import check_rerun

    return check_rerun(run_dir, snapshot, resume,
                       has_checkpoint=any((run_dir / CHECKPOINT_DIR).glob(Path(LAST_CHECKPOINT).stem + "*")))


def prepare_device(cfg: DictConfig, s: Settings) -> torch.device:
    """The device models load on (checked against the pair's settings) and the number of training processes,
    with every RNG seeded."""
    import lightning as L

    device = resolve_device(cfg.trainer.get("accelerator", "auto"))
    s.world_size = world_size(cfg.trainer)
    s.pair.validate(device)
    L.seed_everything(s.seed, workers=True, verbose=False)
    return device


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """The run's loggers: CSV, and W&B when configured."""
    from distillspec.lit.loggers import build_loggers

    run_name = f"{cfg.name}/{run_dir.name}" if run_dir.name else str(cfg.name)
    wandb_cfg = OmegaConf.to_container(cfg.logger.wandb, resolve=True) if cfg.logger.get("wandb") else None
    return build_loggers(run_dir, run_name=run_name, wandb=wandb_cfg, config=OmegaConf.to_container(cfg, resolve=True))


def late_target(s: Settings, data: Data, models, device, out: dict, clock: PhaseClock):
    """After training, for a run that did not hold the target: load it, once, for both evaluations, and evaluate
    the untrained draft (reloaded from pair.draft) when compared; returns that evaluation or None."""
    from distillspec import teacherless

    teacherless.load_target(s.pair, models, device)
    clock.done("target_load")
    if not (s.compare_untrained and data.eval_items):
        return None
    untrained = dataclasses.replace(models, draft=teacherless.load_untrained_draft(s.pair, device))
    before = untrained_eval(untrained, data.tokenizer, s.task, data.eval_items, s.sd, data.eval_tokens, s.seed,
                            device, out)
    del untrained
    clock.done("untrained_eval")
    return before


def final_eval(s: Settings, data: Data, models, device, loggers, run_dir: Path, out: dict, before) -> None:
    """Batched SD evaluation of the (trained) draft into `out`: metrics, the curve's last point, per-example
    results, and the before/after table when the untrained draft was evaluated."""
    report = evaluate(models, data.tokenizer, s.task, data.eval_items, s.sd, data.eval_tokens, s.seed, device,
                      loggers, step=(out.get("train") or {}).get("steps"))
    out["metrics"] = report.metrics
    history = (out.get("train") or {}).get("eval_history")
    if history is not None and s.train.eval_every and curve_covers_eval(s, data) \
            and s.train.max_steps % s.train.eval_every == 0:
        point = {C.VAL_PREFIX + k: float(v) for k, v in report.metrics.items()}
        history.append({"step": out["train"]["steps"], **point})  # the last curve point (skipped in training)
        for lg in loggers:
            lg.log_metrics(point, step=out["train"]["steps"])
    out["entropy_bins"] = report.entropy_bins
    out["examples"] = report.examples
    write_json_atomic(run_dir / "per_example.json", report.per_example)
    if before is not None:
        write_before_after(out, report, run_dir)


def write_results(out: dict[str, Any], clock: PhaseClock, run_dir: Path, loggers) -> dict[str, Any]:
    """metrics.json (with the phase times), the loggers closed, the headline numbers logged."""
    out["phase_seconds"] = phases = clock.seconds
    out[C.PHASE_PEAK_RSS_GIB] = clock.peak_gib
    peak = clock.run_peak_bytes()
    out[C.PEAK_RSS_GIB] = None if peak is None else round(peak / 2**30, 2)
    write_json_atomic(run_dir / C.METRICS_FILE, out)
    for lg in loggers:
        lg.finalize("success")
    log.info("wrote %s", run_dir / C.METRICS_FILE)
    log_summary(out)
    if phases:
        log.info("phase times: %s", ", ".join(f"{k.replace('_', ' ')} {v / 60:.1f} min" for k, v in phases.items()))
    if peak is not None:
        by_phase = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in clock.peak_gib.items())
        log.info("peak memory of this process: %.2f GiB%s", peak / 2**30, f" (by phase: {by_phase})" if by_phase else "")
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
    for point in (out.get("train") or {}).get("eval_history", []):  # SD's or held-out acceptance, as measured
        shown = {k: point[C.VAL_PREFIX + k] for k in (C.ALPHA_TOK, C.ALPHA_EXPECTED, C.ALPHA_HELDOUT)
                 if C.VAL_PREFIX + k in point}
        log.info("training step %s: %s", point["step"], " ".join(f"{k}={v:.4f}" for k, v in shown.items()))


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
