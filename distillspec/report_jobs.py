"""Reading a sweep's jobs for the report (distillspec.report): one row per job from its metrics.json,
per_example.json, .hydra/config.yaml and csv/metrics.csv, its method label from the config, and the failed
jobs' error.json. A job with a damaged file is named in one line and left out (listed as unreadable)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from distillspec import constants as C
from distillspec.jsonio import DamagedFileError, read_json
from distillspec.sd.metrics import RATIO_PARTS, bootstrap_ci

log = logging.getLogger("distillspec.report")

SEED_MARK = "@seed"  # in a sweep with several seeds, labels of jobs not at its first seed: "fkl/teacher@seed2"


# What a method label adds to the divergence's name, in order: (config key, text when the key is set, i.e. not
# absent, null, false or "none"; {v} is its value). A setting that should tell jobs apart is one more entry here.
LABEL_PARTS = (
    ("div.adaptive.reverse", "-rev"),                    # adaptive_reversed: the opposite schedule
    ("div.gate", "+speckd"),                             # SpecKD's gate
    ("div.block_weighting", "+{v}"),                     # block / block_avg token weights
    ("pair.target_quantization", "+{v}-teacher"),        # distilled against a quantized teacher
)


def _config_value(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def method_label(cfg: dict[str, Any], stage: str) -> str:
    """The job's label from its composed config: baseline for eval-only runs, else the divergence, each set
    LABEL_PARTS entry and the rollout source unless student ("adaptive-rev/teacher", "jsd+8bit-teacher/teacher")."""
    if stage == C.STAGE_EVAL:
        return "baseline"
    label = str(_config_value(cfg, "div.divergence") or "?")
    for key, text in LABEL_PARTS:
        if (v := _config_value(cfg, key)) not in (None, False, "none", {}, ""):
            label += text.format(v=v)
    source = _config_value(cfg, "rollout.source") or "student"
    return label if source == "student" else f"{label}/{source}"


FIX = "delete it and rerun the sweep to run this job again"  # what to do about a damaged file of a job


def read_job_json(path: Path, kind: type = dict) -> Any:
    """A job's JSON file (a `kind`); DamagedFileError naming it when it is not valid JSON of that kind."""
    data = read_json(path, fix=FIX)
    if not isinstance(data, kind):
        raise DamagedFileError(f"{path} is damaged: a JSON {type(data).__name__}, not a {kind.__name__}; {FIX}")
    return data


def trained_origin(draft: str) -> tuple[str, str] | None:
    """(label, draft) of the run that trained the draft saved at `draft` (a run dir's draft/ folder, as
    stage=eval draft_checkpoint=<run>/draft evaluates it): that run's method label and the draft it started
    from; None when `draft` is not in a finished run's dir."""
    run_dir = Path(draft).parent
    metrics = run_dir / C.METRICS_FILE
    if not (run_dir / ".hydra" / "config.yaml").is_file() or not metrics.is_file():
        return None
    saved = read_job_json(metrics)
    return method_label(read_job_config(run_dir), saved.get("stage", "")), saved.get("draft", "")


def saved_origin(saved: dict[str, Any], metrics_path: Path) -> tuple[str, str] | None:
    """(label, draft) that an evaluation of a trained draft recorded under TRAINED_BY when it ran (it survives
    copying the job without its training run); None when absent; DamagedFileError when malformed."""
    origin = saved.get(C.TRAINED_BY)
    if origin is None:
        return None
    if not (isinstance(origin, dict) and all(isinstance(origin.get(k), str) for k in ("method", "draft"))):
        raise DamagedFileError(f"{metrics_path} is damaged: {C.TRAINED_BY} is not {{\"method\": str, \"draft\": str}}; "
                               f"{FIX}")
    return origin["method"], origin["draft"]


def read_job_config(job_dir: Path) -> dict[str, Any]:
    """The job's .hydra/config.yaml ({} when missing); DamagedFileError naming it when it is not a YAML mapping."""
    import yaml

    cfg_file = job_dir / ".hydra" / "config.yaml"
    if not cfg_file.exists():
        return {}
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = f"{exc.problem}: line {mark.line + 1} column {mark.column + 1}" if mark and getattr(
            exc, "problem", None) else " ".join(str(exc).split())[:200]
        raise DamagedFileError(f"{cfg_file} is damaged: not valid YAML ({reason}); {FIX}") from None
    if not isinstance(cfg, dict):
        raise DamagedFileError(f"{cfg_file} is damaged: not a YAML mapping; {FIX}")
    return cfg


def load_job(metrics_path: Path) -> dict[str, Any] | None:
    """One row for the summary table (None for jobs without SD metrics, e.g. stage=train). DamagedFileError
    (one line naming the file) when one of the job's files is damaged."""
    job_dir = metrics_path.parent
    saved = read_job_json(metrics_path)
    metrics = saved.get("metrics")
    if not metrics:
        return None
    cfg = read_job_config(job_dir)
    sd = cfg.get("sd", {})
    method, draft = method_label(cfg, saved.get("stage", "")), saved.get("draft", "")
    if (origin := saved_origin(saved, metrics_path)) is not None or (
            cfg.get("draft_checkpoint") and (origin := trained_origin(draft)) is not None):
        method, draft = origin  # a trained draft evaluated again (another SD setting): its training's row
    row: dict[str, Any] = {
        "job": str(job_dir), "method": method,
        "task": saved.get("task", ""), "draft": draft, "target": saved.get("target", ""),
        "divergence": cfg.get("div", {}).get("divergence"), "rollout": cfg.get("rollout", {}).get("source"),
        "seed": cfg.get("seed", 0),
        "gamma": int(metrics[C.GAMMA]) if C.GAMMA in metrics else sd.get("gamma"),  # the used one (sd.gamma=auto)
        "temperature": sd.get("temperature"), "top_p": sd.get("top_p"),
        "lenience": sd.get("lenience"), "epsilon": sd.get("epsilon"), **metrics,
        C.PEAK_RSS_GIB: saved.get(C.PEAK_RSS_GIB),
    }
    per_ex_file = job_dir / "per_example.json"
    row["_per_example"] = None
    if per_ex_file.exists():
        per_ex = pd.DataFrame(read_job_json(per_ex_file, list))
        for key, (num, den) in RATIO_PARTS.items():
            if num in per_ex and den in per_ex:
                row[key + "_ci_lo"], row[key + "_ci_hi"] = bootstrap_ci(per_ex[num].to_numpy(float),
                                                                        per_ex[den].to_numpy(float))
        row["_per_example"] = per_ex
    row["_entropy_bins"] = saved.get("entropy_bins", [])
    row["_train_entropy"] = train_entropy_shares(job_dir / "csv" / "metrics.csv")
    row["_eval_history"] = saved.get("train", {}).get("eval_history", [])
    return row


def train_entropy_shares(csv_path: Path) -> dict[str, float]:
    """Share of the training tokens per teacher-entropy bin ("<lo>-<hi>" nats), averaged over the logged steps
    (csv/metrics.csv, C.TRAIN_TOKENS_BY_ENTROPY columns); {} without training rows."""
    if not csv_path.exists():
        return {}
    frame = pd.read_csv(csv_path)
    cols = [c for c in frame.columns if c.startswith(C.TRAIN_TOKENS_BY_ENTROPY)]
    return {c[len(C.TRAIN_TOKENS_BY_ENTROPY):]: float(frame[c].dropna().mean()) for c in cols
            if frame[c].notna().any()}


def collect(sweep_dir: Path, allow_empty: bool = False, unreadable: list | None = None) -> pd.DataFrame:
    """One row per job with SD metrics. A job with a damaged file is left out, its one-line error logged (and
    appended to `unreadable` as {"job", "status": "unreadable", "error"} when given)."""
    rows = []
    for p in sorted(sweep_dir.rglob(C.METRICS_FILE)):
        try:
            row = load_job(p)
        except DamagedFileError as exc:
            log.warning("left out of the report: %s", exc)
            if unreadable is not None:
                unreadable.append({"job": str(p.parent), "status": "unreadable", "error": str(exc)})
            continue
        if row is not None:
            rows.append(row)
    if not rows and not allow_empty:
        raise SystemExit(f"no {C.METRICS_FILE} with SD metrics under {sweep_dir}")
    return mark_seeds(pd.DataFrame(rows))


def mark_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Jobs repeated with another seed keep their own rows: where a sweep has several seeds, the label of each
    job not at the sweep's first seed gets SEED_MARK + seed (so tables do not merge or pick between repeats)."""
    if df.empty or "seed" not in df or df["seed"].nunique() < 2:
        return df
    first = df["seed"].min()
    return df.assign(method=[m if s == first else f"{m}{SEED_MARK}{s}" for m, s in zip(df["method"], df["seed"])])


def collect_failures(sweep_dir: Path) -> pd.DataFrame:
    """One row per failed job (its error.json, distillspec.sweep; none once a rerun finished it): job, method,
    gamma, status "failed", error type, exit code and the first line of the message."""
    rows = []
    for path in sorted(sweep_dir.rglob(C.ERROR_FILE)):
        if (path.parent / C.METRICS_FILE).exists():
            continue  # finished on a later attempt
        try:
            err = read_job_json(path)
        except DamagedFileError as exc:  # still a failed job: say so, with what is wrong with its record
            err = {"error_type": "unreadable", "message": str(exc)}
        try:
            cfg = read_job_config(path.parent)
        except DamagedFileError:
            cfg = {}
        rows.append({"job": str(path.parent), "status": "failed", "method": method_label(cfg, cfg.get("stage", "")),
                     "task": (cfg.get("task") or {}).get("_target_", "").rsplit(".", 1)[-1],
                     "gamma": (cfg.get("sd") or {}).get("gamma"), "error_type": err.get("error_type"),
                     "exit_code": err.get("exit_code"),
                     "error": (err.get("message") or "").splitlines()[0][:200] if err.get("message") else ""})
    return pd.DataFrame(rows)
