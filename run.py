"""distillspec entry point.

    python run.py                                   # distil the offline draft on the built-in task, evaluate
    python run.py task=gsm8k div=jsd                # another task / divergence
    python run.py -m div=fkl,rkl,jsd sd.gamma=3,5   # Hydra multirun sweep (multirun/<name>/...)
    python run.py stage=eval pair.draft=<id or dir> # measure a draft with no training
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distillspec import constants as C
from distillspec.errors import ConfigError, EngineError, NonFiniteError
from distillspec.resolvers import register

register()  # before @hydra.main composes the config

log = logging.getLogger("distillspec")


# Overrides that describe what an evaluation of the trained draft needs (task, target, SD settings).
EVAL_KEYS = ("task", "pair", "sd", "seed", "trainer", "logger", "experiment", "paths")


def eval_command(overrides: list[str], draft_dir: Path, launch_dir: Path) -> str:
    """The `python run.py stage=eval ...` line that re-evaluates `draft_dir` with this run's task and SD."""
    keep = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0].split("/")[0] in EVAL_KEYS]
    try:
        path = draft_dir.resolve().relative_to(launch_dir.resolve())
    except ValueError:
        path = draft_dir
    return " ".join(shlex.quote(a) for a in ["python", "run.py", "stage=eval", *keep, f"draft_checkpoint={path}"])


def full_precision_overrides(overrides: list[str]) -> list[str]:
    """`overrides` with any pair.target_quantization setting replaced by pair.target_quantization=null."""
    key = "pair.target_quantization"
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key] + [f"{key}=null"]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.types import RunMode

    from distillspec.hydra_callbacks import TAKEN_OVER
    from distillspec.rundir import LOCK_FILE, RunDirInUse, lock_run_dir, release_run_dir
    from distillspec.runner import run
    from distillspec.sweep import clear_failure, exit_code, record_failure

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    launch_dir = Path(hydra.utils.get_original_cwd())
    sweep = hc.mode == RunMode.MULTIRUN
    try:  # a sweep job's lock (a single run's was taken before Hydra wrote into the run dir: hydra_callbacks)
        stale = lock_run_dir(run_dir) or (TAKEN_OVER.pop() if TAKEN_OVER else None)
    except RunDirInUse as exc:  # another launch runs in this dir: touch nothing of it (not even its run.log)
        for h in logging.getLogger().handlers[:]:
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir:
                logging.getLogger().removeHandler(h)
                h.close()
        if not sweep:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(C.EXIT_CONFIG_ERROR)
        record_failure(run_dir, Path(hc.sweep.dir), exc, list(hc.overrides.task), job_files=False)
        log.error("configuration error: %s (job %s; the sweep goes on)", exc, run_dir.name)
        return
    if stale:
        log.warning("took over %s from pid %s on host %s (started %s), which ended without releasing it "
                    "(killed?)", run_dir / LOCK_FILE, stale.get("pid"), stale.get("host"), stale.get("since"))
    try:
        if sweep:
            clear_failure(run_dir)  # a rerun of the sweep runs a failed job again
        out = run(cfg, run_dir, launch_dir)
        draft_dir = (out.get("train") or {}).get("draft_dir")
        if draft_dir:
            cmd = eval_command(list(hc.overrides.task), Path(draft_dir), launch_dir)
            log.info("trained draft saved; evaluate it again with:\n  %s", cmd)
            if (quant := cfg.pair.get("target_quantization")) and not cfg.pair.get("verify_full_precision"):
                full = eval_command(full_precision_overrides(list(hc.overrides.task)), Path(draft_dir), launch_dir)
                log.info("pair.target_quantization=%s: this run distilled against (and SD-evaluated with) the "
                         "%s target; serving verifies with the full-precision one. Measure the draft against "
                         "it with (or set pair.verify_full_precision=true):\n  %s", quant, quant, full)
            log_serving(out, run_dir, Path(draft_dir), launch_dir, cfg.sd.gamma)
    except Exception as exc:  # noqa: BLE001 - a sweep records any job's failure and goes on
        code = exit_code(exc)
        what = "configuration error" if isinstance(exc, ConfigError) else "training stopped" if isinstance(
            exc, NonFiniteError) else "generation engine failed" if isinstance(exc, EngineError) else "failed"
        if sweep:
            record_failure(run_dir, Path(hc.sweep.dir), exc, list(hc.overrides.task))
            log.error("%s: %s (job %s; the sweep goes on, see %s)", what, exc, run_dir.name, run_dir / C.ERROR_FILE,
                      exc_info=code is None)
            return
        if code is None:
            raise
        log.error("%s: %s", what, exc)
        if isinstance(exc, ConfigError):  # refused: leave no empty run dir behind
            from distillspec.hydra_callbacks import NEW_RUN_DIRS
            from distillspec.rundir import remove_new_run_dir

            logging.shutdown()  # close run.log
            remove_new_run_dir(NEW_RUN_DIRS)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(code)
    finally:
        release_run_dir(run_dir)


def log_serving(out: dict, run_dir: Path, draft_dir: Path, launch_dir: Path, gamma) -> None:
    """The commands that serve the trained draft in vLLM and compare vLLM's counters with ours; where vLLM
    cannot serve the pair (distillspec.serving.commands.vllm_refusal), the reason instead."""
    import torch

    from distillspec.models.loading import resolve_model_path
    from distillspec.serving.commands import serve_command, vllm_command, vllm_refusal

    def rel(p: Path) -> Path:
        try:
            return p.resolve().relative_to(launch_dir.resolve())
        except ValueError:
            return p

    if why := vllm_refusal({"target": resolve_model_path(out["target"]), "draft": draft_dir},
                           torch.cuda.is_available()):
        log.info("not serving this draft in vLLM: %s", why)
        return
    gamma = int((out.get("metrics") or {}).get(C.GAMMA, 0)) or (gamma if isinstance(gamma, int) else None)
    if out.get("metrics"):
        log.info("compare vLLM's acceptance counters with ours (needs `make vllm`):\n  %s",
                 vllm_command(rel(run_dir)))
    if gamma:
        log.info("serve it with vLLM:\n  %s", serve_command(resolve_model_path(out["target"]), str(rel(draft_dir)),
                                                           gamma, cuda=torch.cuda.is_available()))


def check_cli(argv: list[str]) -> None:
    """Before Hydra creates outputs/<name>/ (its errors there are tracebacks): refuse a bad `name=` override
    (distillspec.rundir.check_name) and an unwritable outputs/ or multirun/ (unless the command sets its own
    hydra.run.dir / hydra.sweep.dir, or only prints: --cfg, --help, --info)."""
    from distillspec.rundir import check_name, check_writable

    try:
        for arg in argv:
            if arg.lstrip("+").startswith("name="):
                check_name(arg.split("=", 1)[1])
        prints = any(a.split("=")[0] in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i") for a in argv)
        own_dir = any(a.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in argv)
        if not prints and not own_dir:
            check_writable(Path("multirun" if {"-m", "--multirun"} & set(argv) else "outputs"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_cli(sys.argv[1:])
    main()
