"""Serve a finished run's draft in vLLM and compare vLLM's own acceptance counters with our engine's.

    make vllm-check RUN=outputs/<name>/<run>        # or: python -m distillspec.serving.check outputs/<name>/<run>

Runs in the project environment; vLLM runs in the serving environment (`make vllm` -> .venv-vllm, or
--vllm-python / $DISTILLSPEC_VLLM_PYTHON), one process per generation (`distillspec.serving.vllm_runner`).
From the run dir it takes the composed config (run_config.json) and metrics.json: the same eval prompts
(task, chat template, prompt cap, seed, sd.num_eval), sampling (T, top-p), gamma, max_new_tokens, target,
and the draft: `<run>/draft` when the run trained one (refused when it is gone), else the draft it evaluated.

Before any work it refuses (one line, exit 2): a sweep dir, an unfinished or damaged run, a trained run
without its draft, a pair vLLM's CPU build cannot run (`serving.commands.vllm_refusal`), and a serving
python that cannot `import vllm`. Then:
  ours:  SD in the run's block alignment and in vLLM's (`first_token=prefill`), same seeds as the run; at
         T > 0 also draft = target (every drafted token must be accepted). Our models are then freed.
  vLLM:  target alone (tokens/s), and the draft with vLLM's default draft sampling; at T > 0 also
         draft_sample_method=probabilistic and, for each mode, draft = target (the self-draft sanity row),
         and both with vLLM's CPU fault patched. The KV space of each job is sized from its prompts and the
         machine's free memory (`jobs.kv_cache_bytes`). A job that fails is a FAILED row (reason and log,
         kept in <run>/vllm_logs/); the others are still measured and written.
Writes `vllm_metrics.json` and `vllm_check.md` beside metrics.json and prints the table. Rates carry 95 %
bootstrap CIs over prompts; at T > 0 a disagreement is flagged only outside that noise (`serving.stats`).
Exit 0 when every job ran (disagreements are flagged in the table, never hidden), 1 when some vLLM job
failed (the table says which and why), 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import sys
from pathlib import Path
from typing import Any

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.jsonio import read_json
from distillspec.serving import compare as cmp
from distillspec.serving.commands import serve_command, vllm_command, vllm_refusal
from distillspec.serving.jobs import (LOG_DIR, VLLM_PY_ENV, available_memory, default_vllm_python, kv_cache_bytes,
                                      plan_jobs, probe_vllm_python, run_vllm)
from distillspec.serving.render import render

log = logging.getLogger("distillspec")

RESULT_FILE = "vllm_metrics.json"
TABLE_FILE = "vllm_check.md"
DRAFT_DIR = "draft"  # = distillspec.lit.train_loop.DRAFT_DIR (not imported: that module pulls in Lightning)


@dataclasses.dataclass
class RunInfo:
    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    draft: str   # model name or dir as our loaders take it
    target: str


def _job_dirs(d: Path) -> list[Path]:
    return sorted({p.parent for pat in ("*/" + C.METRICS_FILE, "*/*/" + C.METRICS_FILE) for p in d.glob(pat)})


def load_run(run_dir: Path) -> RunInfo:
    """A finished run's config and metrics; ConfigError naming what is missing, damaged or wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: pass a finished run dir (outputs/<name>/<run>)")
    cfg_file, met_file = run_dir / C.RUN_CONFIG_FILE, run_dir / C.METRICS_FILE
    if not met_file.is_file() and (jobs := _job_dirs(run_dir)):
        raise ConfigError(f"{run_dir} is a sweep dir ({len(jobs)} job dirs with {C.METRICS_FILE}); the check "
                          f"takes one job dir, e.g. `make vllm-check RUN={jobs[0]}`")
    for f in (cfg_file, met_file):
        if not f.is_file():
            raise ConfigError(f"{run_dir} is not a finished run: {f.name} is missing (run `python run.py ...` "
                              "to the end first; the check compares against its evaluation)")
    fix = "rerun the run (the check reads it)"
    metrics = read_json(met_file, "the run's results", fix)
    config = read_json(cfg_file, "the run's composed config", fix)
    if not isinstance(metrics, dict) or not isinstance(config, dict):
        raise ConfigError(f"{met_file if not isinstance(metrics, dict) else cfg_file} is damaged: not a JSON "
                          f"object; {fix}")
    if "metrics" not in metrics:
        raise ConfigError(f"{met_file} has no evaluation (stage={metrics.get('stage')!r}); check a run with "
                          "stage=train_eval or stage=eval")
    for key in ("draft", "target"):
        if not metrics.get(key):
            raise ConfigError(f"{met_file} names no {key}; {fix}")
    draft_dir = run_dir / DRAFT_DIR
    trained = metrics.get("stage") in (C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL) or (metrics.get("train") or {}).get("draft_dir")
    if trained and not (draft_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} trained a draft but {draft_dir} is "
                          + ("incomplete (no config.json)" if draft_dir.is_dir() else "missing")
                          + f": refusing to check the untrained {metrics['draft']} in its place; restore the "
                          "draft dir or rerun the training")
    draft = str(draft_dir) if trained else str(metrics["draft"])
    return RunInfo(run_dir, config, metrics, draft, str(metrics["target"]))


def build_specs(info: RunInfo):
    """(task, sd spec, seed, max_new_tokens) of the run, through the same `_target_` nodes as the runner."""
    from omegaconf import OmegaConf

    from distillspec.runner import absolutize, build

    cfg = OmegaConf.create(info.config)
    for key in ("path", "train_path"):
        if cfg.task.get(key) is not None:
            cfg.task[key] = absolutize(cfg.task[key], Path.cwd())
    task, sd = build(cfg.task, "task"), build(cfg.sd, "sd")
    if sd.gamma == "auto":
        sd = dataclasses.replace(sd, gamma=int(info.metrics["metrics"][C.GAMMA]))
    return task, sd, int(cfg.seed), int(sd.max_new_tokens or task.max_new_tokens)


def preflight(run_dir: Path, cuda: bool) -> tuple[RunInfo, str, str]:
    """(run info, target dir, draft dir), or ConfigError: every refusal that needs no serving env."""
    from distillspec.models.loading import resolve_model_path

    info = load_run(run_dir)
    target_dir, draft_dir = resolve_model_path(info.target), resolve_model_path(info.draft)
    if why := vllm_refusal({"target": target_dir, "draft": draft_dir}, cuda):
        raise ConfigError(why)
    return info, target_dir, draft_dir


def _free_models() -> None:
    """After the caller dropped its references: collect them, and CUDA's cache."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check(run_dir: Path, python: Path, timeout: float = 1800.0, patch: bool = True,
          rows: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the check on a finished run dir; returns (and writes) vllm_metrics.json's content."""
    import torch

    cuda = torch.cuda.is_available()
    info, target_dir, draft_dir = preflight(run_dir, cuda)
    version = probe_vllm_python(python)
    log.info("serving python %s: vLLM %s", python, version)
    task, sd, seed, max_new = build_specs(info)
    sampled, patch = sd.temperature > 0, patch and not cuda
    plan_jobs({}, draft_dir, target_dir, sampled, patch, rows)  # a bad --rows: refused now

    ours, prompts, stop_ids = run_ours_rows(info, task, sd, seed, max_new)
    max_model_len = max(1024, max(map(len, prompts)) + max_new + sd.gamma + 16)
    base = {"target": target_dir, "gamma": sd.gamma, "prompts": prompts, "temperature": sd.temperature,
            "top_p": sd.top_p, "max_tokens": max_new, "seed": seed if sampled else None, "stop_token_ids": stop_ids,
            "dtype": "float32", "warmup_tokens": 8, "max_model_len": max_model_len}
    vllm_raw = {}
    for job in plan_jobs(base, draft_dir, target_dir, sampled, patch, rows):
        models = [target_dir] + ([job["draft"]] if job.get("draft") else [])
        job["kv_cache_memory_bytes"] = None if cuda else kv_cache_bytes(
            list(map(len, prompts)), max_new, sd.gamma, max_model_len, models, available_memory())
        vllm_raw[job["tag"]] = run_vllm(python, job, run_dir / LOG_DIR, timeout)
    vllm = {k: cmp.vllm_summary(v) for k, v in vllm_raw.items()}

    agreement = agreement_of(info, ours, vllm, vllm_raw, prompts, sampled)
    strip = lambda d: {k: x for k, x in d.items() if k != "outputs"}  # noqa: E731
    res = {"run_dir": str(run_dir), "vllm_version": version, "platform": "CUDA" if cuda else "CPU",
           "settings": {"temperature": sd.temperature, "top_p": sd.top_p, "gamma": sd.gamma, "max_new_tokens": max_new,
                        "num_prompts": len(prompts), "seed": seed, "first_token": sd.first_token,
                        "target": target_dir, "draft": draft_dir},
           "ours": {k: strip(x) for k, x in ours.items()}, "vllm": vllm,
           "failed": {k: {"reason": v["reason"], "log": v["log"]} for k, v in vllm_raw.items() if v.get("failed")},
           "vllm_load_s": {k: x["load_s"] for k, x in vllm_raw.items() if "load_s" in x},
           "table": cmp.side_by_side(ours["run"], ours["aligned"], vllm.get("draft_default", {"skipped": True}),
                                     sd.gamma),
           "agreement": agreement, "speed": speed_of(info, vllm),
           "modes": cmp.mode_rows(ours, vllm, sd.gamma, sd.top_p) if sampled else [],
           "outputs": {"ours_aligned": ours["aligned"]["outputs"],
                       **{k: x["outputs"] for k, x in vllm_raw.items() if "outputs" in x}},
           "commands": {"check": vllm_command(run_dir), "serve": serve_command(target_dir, draft_dir, sd.gamma)}}
    write_result(run_dir, res)
    return res


def run_ours_rows(info: RunInfo, task, sd, seed: int, max_new: int) -> tuple[dict, list[list[int]], list[int]]:
    """Our engine on the run's eval prompts: ({"run": the run's block alignment, "aligned": vLLM's, and at
    T > 0 "self": draft = target}, the prompts' token ids, the stop ids). The models are freed on return."""
    from distillspec.evaluation import eos_token_ids
    from distillspec.models.loading import load_model, load_tokenizer
    from distillspec.serving.ours import run_ours

    tokenizer = load_tokenizer(info.target)
    items = task.encode(task.load("eval"), tokenizer, limit=sd.num_eval, seed=seed)
    target = load_model(info.target, dtype="float32").eval()
    draft = load_model(info.draft, dtype="float32").eval()
    ours = {"run": run_ours(draft, target, tokenizer, task, items, sd, max_new, seed, sd.first_token),
            "aligned": run_ours(draft, target, tokenizer, task, items, sd, max_new, seed, "prefill")}
    if sd.temperature > 0:
        ours["self"] = run_ours(target, target, tokenizer, task, items, sd, max_new, seed, "prefill")
    stop_ids = eos_token_ids(tokenizer, target)
    del draft, target
    _free_models()  # vLLM gets the memory our models held
    return ours, [list(map(int, it.input_ids)) for it in items], stop_ids


def agreement_of(info: RunInfo, ours: dict, vllm: dict, vllm_raw: dict, prompts: list[list[int]],
                 sampled: bool) -> dict[str, Any]:
    """How vLLM's default draft row agrees with ours in its alignment: mean acceptance length and per-position
    rates; greedy (not `sampled`) also outputs and exact counters (`greedy_agreement`)."""
    o_al = ours["aligned"]
    agreement: dict[str, Any] = {"recomputed_matches_run": bool(math.isclose(
        ours["run"]["alpha_tok"], info.metrics["metrics"][C.ALPHA_TOK], abs_tol=1e-9))}
    v = vllm.get("draft_default", {"skipped": True})  # not run: --rows left it out
    if v.get("failed") or v.get("skipped"):
        return agreement
    agreement.update(
        vllm_mal=v["mean_acceptance_length"], ours_mal=o_al["mean_acceptance_length"],
        mal_rel_diff=v["mean_acceptance_length"] / o_al["mean_acceptance_length"] - 1.0,
        max_pos_diff=max((abs(x - y) for x, y in zip(v["per_position"], o_al["per_position"])), default=0.0))
    if not sampled:
        agreement.update(greedy_agreement(info, o_al, v, vllm_raw, prompts))
    return agreement


def greedy_agreement(info: RunInfo, o_al: dict, v: dict, vllm_raw: dict, prompts: list[list[int]]) -> dict:
    """At T = 0 both engines decode exactly greedily: identical rows (with and without a draft), each differing
    row with the target's top-2 gap there (floating-point ties), and the counters' differences."""
    from distillspec.models.loading import load_model
    from distillspec.serving.ours import tie_analysis

    out_v = vllm_raw["draft_default"]["outputs"]
    same = cmp.identical_rows(o_al["outputs"], out_v)
    t_only = vllm_raw.get("target_only", {})
    agreement: dict[str, Any] = {
        "identical_rows": sum(same),
        "identical_rows_target_only": sum(cmp.identical_rows(o_al["outputs"], t_only["outputs"]))
        if "outputs" in t_only else None,
        "mismatches": []}
    mismatched = [i for i, ok in enumerate(same) if not ok]
    if mismatched:
        target = load_model(info.target, dtype="float32").eval()
        agreement["mismatches"] = [dict(row=i, **tie_analysis(target, prompts[i], o_al["outputs"][i], out_v[i]))
                                   for i in mismatched]
        del target
        _free_models()
    d = agreement["counter_diffs"] = cmp.exact_counter_diffs(o_al, v)
    agreement["counters_equal"] = not any(d[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")) \
        and not any(d["per_position"])
    return agreement


def speed_of(info: RunInfo, vllm: dict) -> dict[str, Any]:
    """vLLM's tokens/s without and with the draft, its speedup, and the run's own speedup."""
    v, t = vllm.get("draft_default", {}), vllm.get("target_only", {})
    v_ok, t_ok = "tokens_per_s" in v, "tokens_per_s" in t
    return {"vllm_target_tokens_per_s": t["tokens_per_s"] if t_ok else None,
            "vllm_sd_tokens_per_s": v["tokens_per_s"] if v_ok else None,
            "vllm_speedup": v["tokens_per_s"] / t["tokens_per_s"] if v_ok and t_ok else None,
            "ours_speedup": info.metrics["metrics"].get(C.SPEEDUP)}


def write_result(run_dir: Path, res: dict[str, Any]) -> None:
    """vllm_metrics.json and vllm_check.md beside the run's metrics.json, each whole or not at all."""
    from distillspec.jsonio import write_json_atomic

    write_json_atomic(run_dir / RESULT_FILE, res)
    tmp = run_dir / (TABLE_FILE + ".tmp")
    tmp.write_text(render(res))
    tmp.replace(run_dir / TABLE_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillspec.serving.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run: outputs/<name>/<overrides>")
    parser.add_argument("--vllm-python", type=Path, default=None,
                        help=f"python of the serving env (default ${VLLM_PY_ENV} or .venv-vllm/bin/python)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per vLLM process")
    parser.add_argument("--no-patched", action="store_true",
                        help="skip the rows that rerun vLLM with its CPU T > 0 fault patched")
    parser.add_argument("--rows", default=None,
                        help="comma-separated vLLM rows to run (default all), e.g. "
                             "target_only,draft_default,draft_probabilistic_patched")
    parser.add_argument("--preflight", action="store_true",
                        help="only the refusals that need no serving env (run dir, draft, head sizes); "
                             "`make vllm-check` runs it before building the serving env")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else None
    try:
        if args.preflight:
            import torch

            preflight(args.run_dir, torch.cuda.is_available())
            return 0
        res = check(args.run_dir, args.vllm_python or default_vllm_python(), args.timeout, not args.no_patched, rows)
    except ConfigError as exc:
        print(f"vllm-check: {exc}", file=sys.stderr)
        return 2
    print(render(res))
    print(f"wrote {args.run_dir / RESULT_FILE} and {args.run_dir / TABLE_FILE}")
    if res["failed"]:
        print(f"vllm-check: {len(res['failed'])} vLLM job(s) failed: {', '.join(res['failed'])} (reasons and logs "
              f"in {args.run_dir / TABLE_FILE})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
