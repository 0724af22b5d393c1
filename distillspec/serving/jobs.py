"""The vLLM side of the check, seen from the project environment: the serving python, the jobs, their KV space.

  probe_vllm_python  `import vllm` in the serving python before any work (ConfigError naming it otherwise)
  plan_jobs          the vLLM generations the check runs (tags: target_only, draft_default, ...)
  kv_cache_bytes     the KV space one job needs for its prompts, capped by the machine's free memory
  run_vllm           one `distillspec.serving.vllm_runner` process; a failure is a row marked failed (its
                     reason and its log, kept in <run>/vllm_logs/), never an exception that loses the others
Standard library only (no torch, no vLLM).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from distillspec.errors import ConfigError

log = logging.getLogger("distillspec")

REPO = Path(__file__).resolve().parents[2]
VLLM_PY_ENV = "DISTILLSPEC_VLLM_PYTHON"
LOG_DIR = "vllm_logs"      # <run>/vllm_logs/<tag>.{job.json,out.json,log}: kept, failed or not
VLLM_MODES = ("greedy", "probabilistic")  # vLLM 0.32 draft_sample_method values; "greedy" is its default
MIN_VLLM = (0, 32)         # draft_sample_method and per-request spec-decode metrics (vLLM 0.32)
_PROC_PREFIX = re.compile(r"^\([\w:. -]* pid=\d+\)\s*")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b: ?.*")


def default_vllm_python() -> Path:
    env = os.environ.get(VLLM_PY_ENV)
    return Path(env) if env else REPO / ".venv-vllm" / "bin" / "python"


def probe_vllm_python(python: Path, timeout: float = 300.0) -> str:
    """vLLM's version in the serving python (`distillspec.serving.env.check_serving_python`: ConfigError in
    one line naming `python` when it cannot run or cannot import vllm), and at least MIN_VLLM. Called before
    any model is loaded."""
    from distillspec.serving.env import FIX, check_serving_python

    version = check_serving_python(python, timeout)
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if nums < MIN_VLLM:
        raise ConfigError(f"the serving python {python} has vLLM {version}; the check needs vLLM >= "
                          f"{'.'.join(map(str, MIN_VLLM))} (draft_sample_method, per-request spec-decode "
                          f"metrics); {FIX}")
    return version


def error_line(text: str) -> str | None:
    """The root error of a log: its first `SomethingError: ...` line (vLLM nests the cause in wrappers)."""
    for ln in text.splitlines():
        ln = _PROC_PREFIX.sub("", ln.strip())  # vLLM prefixes its engine processes' lines: "(EngineCore pid=7) "
        if _ERROR_LINE.match(ln):
            return ln[:400]
    return None


def plan_jobs(base: dict, draft_dir: str, target_dir: str, sampled: bool, patch: bool,
              rows: tuple[str, ...] | None = None) -> list[dict]:
    """The vLLM generations: target alone, the draft with vLLM's default draft sampling; at T > 0 also the
    probabilistic mode and the self-draft sanity rows (target as its own draft), and with `patch` the same
    with vLLM's CPU expand fault patched. `rows`: only these tags (None: all)."""
    jobs = [dict(base, tag="target_only", draft=None),
            dict(base, tag="draft_default", draft=draft_dir, draft_sample_method=None)]
    if sampled:  # vLLM's draft sampling modes matter only at T > 0
        jobs += [dict(base, tag="draft_probabilistic", draft=draft_dir, draft_sample_method="probabilistic")]
        jobs += [dict(base, tag=f"self_{m}", draft=target_dir, draft_sample_method=m) for m in VLLM_MODES]
        if patch:  # the same with vLLM's CPU expand fault patched (vllm_runner.patch_expand)
            jobs += [dict(base, tag=f"{who}_probabilistic_patched", draft=d, draft_sample_method="probabilistic",
                          patch_cpu_expand=True) for who, d in (("self", target_dir), ("draft", draft_dir))]
    if rows is not None:
        known = [j["tag"] for j in jobs]
        if bad := [r for r in rows if r not in known]:
            raise ConfigError(f"--rows {','.join(bad)}: not a vLLM row of this check; valid: {', '.join(known)}")
        jobs = [j for j in jobs if j["tag"] in rows]
    return jobs


def kv_bytes_per_token(model_dir: str | Path, dtype_bytes: int = 4) -> int | None:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * dtype_bytes (config.json)."""
    from distillspec.serving.commands import head_dim

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    h = head_dim(model_dir)
    if h is None or not cfg.get("num_hidden_layers"):
        return None
    kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return 2 * int(cfg["num_hidden_layers"]) * kv_heads * h * dtype_bytes


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of a model dir's weight files (what vLLM loads into memory)."""
    d = Path(model_dir)
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in d.glob(pat)) if d.is_dir() else 0


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_cache_bytes(prompt_lens: list[int], max_new: int, gamma: int, max_model_len: int,
                   model_dirs: list[str], available: int | None, block: int = 128) -> int | None:
    """KV space for one vLLM job: every prompt at once (prompt + max_new + gamma tokens, rounded up to
    `block`), at least one max_model_len request (vLLM refuses less), over all its models (target and draft
    layers share the space), plus 25 % and 64 MiB. Capped to 80 % of what `available` leaves after the
    weights (vLLM then runs fewer requests at a time), never below one request. None: sizes unknown (vLLM's
    default applies)."""
    per_tok = [kv_bytes_per_token(d) for d in model_dirs]
    if any(b is None for b in per_tok):
        return None
    up = lambda n: math.ceil(n / block) * block  # noqa: E731
    tokens_all = sum(up(n + max_new + gamma + 1) for n in prompt_lens)
    one = sum(per_tok) * up(max_model_len)
    need = max(int(sum(per_tok) * tokens_all * 1.25), one) + (64 << 20)
    if available is not None:
        room = int(0.8 * (available - sum(weights_bytes(d) for d in model_dirs)))
        need = max(min(need, room), one + (64 << 20))
    return need


def run_vllm(python: Path, job: dict, log_dir: Path, timeout: float) -> dict[str, Any]:
    """One vllm_runner process. Its JSON result, or {"failed": True, "reason", "log"} when it fails (the
    log stays in `log_dir`)."""
    tag = job["tag"]
    log_dir.mkdir(parents=True, exist_ok=True)
    job_file, out_file, log_file = (log_dir / f"{tag}.{s}" for s in ("job.json", "out.json", "log"))
    out_file.unlink(missing_ok=True)
    tmp = job_file.with_name(job_file.name + ".tmp")
    tmp.write_text(json.dumps(job))
    tmp.replace(job_file)  # whole or not at all
    from distillspec.serving.env import server_env

    env = server_env(os.environ, {"PYTHONPATH": str(REPO)})
    t0 = time.perf_counter()
    reason = None
    try:
        with open(log_file, "w") as logf:
            proc = subprocess.run([str(python), "-m", "distillspec.serving.vllm_runner", str(job_file),
                                   str(out_file)], stdout=logf, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, cwd=str(REPO))
        if proc.returncode != 0 or not out_file.is_file():
            reason = error_line(log_file.read_text(errors="replace")) or f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout:.0f} s (--timeout)"
    except OSError as exc:
        reason = f"{python} cannot be run: {exc.strerror or exc}"
    if reason is not None:
        log.error("vLLM %s failed: %s (log %s)", tag, reason, log_file)
        return {"failed": True, "reason": reason, "log": str(log_file)}
    out = json.loads(out_file.read_text())
    log.info("vLLM %s: load %.0f s, generate %.0f s", tag, out["load_s"], time.perf_counter() - t0 - out["load_s"])
    return out
