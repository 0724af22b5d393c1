"""The serving commands a run prints, and the one rule for whether vLLM can serve a pair at all.

Used by run.py (`log_serving`, at the end of a training run) and by `distillspec.serving.check` (refuses
before any work). Standard library only: no torch, no vLLM (the rule reads the models' config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

# vLLM 0.32's CPU attention backend (`vllm/v1/attention/backends/cpu_attn.py`, CPUAttentionBackend.
# get_supported_head_sizes in .venv-vllm): any other head size makes its engine die at start-up
# (nested EngineDeadError). The tiny test pair has head_dim 16. CUDA backends support more; not checked here.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_command(run_dir: Path) -> str:
    """The line a user types to run the vLLM check on `run_dir` (printed at the end of training runs)."""
    return f"make vllm-check RUN={run_dir}"


CPU_KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE of a printed CPU serve line (vLLM's CPU default: ~92 % of memory)


def serve_command(target_dir: str, draft_dir: str, gamma: int, port: int = 8000, cuda: bool = False) -> str:
    """The `vllm serve` line that serves `draft_dir` as the draft of `target_dir` (serving env's vllm). On a CPU
    (cuda=False) it bounds vLLM's KV cache with VLLM_CPU_KVCACHE_SPACE, which vLLM's CPU build otherwise sizes to
    most of the machine's memory."""
    spec = json.dumps({"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": int(gamma)})
    env = "" if cuda else f"VLLM_CPU_KVCACHE_SPACE={CPU_KV_CACHE_GIB} "
    return (f"{env}.venv-vllm/bin/vllm serve {target_dir} --dtype float32 --max-model-len 1024 --enforce-eager "
            f"--host 127.0.0.1 --port {port} --speculative-config '{spec}'")


def head_dim(model_dir: str | Path) -> int | None:
    """Attention head size from `model_dir/config.json` (head_dim, else hidden_size / num_attention_heads);
    None when there is no readable local config (a Hub id: vLLM will judge it)."""
    f = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def vllm_refusal(model_dirs: dict[str, str | Path], cuda: bool) -> str | None:
    """Why vLLM cannot serve these models ({role: dir}, e.g. target and draft), or None when it can.

    The rule: vLLM's CPU build (cuda=False) runs only the head sizes in VLLM_CPU_HEAD_SIZES.
    """
    if cuda:
        return None
    for role, d in model_dirs.items():
        h = head_dim(d)
        if h is not None and h not in VLLM_CPU_HEAD_SIZES:
            return (f"vLLM's CPU build cannot serve the {role} {d}: head_dim {h} is not one of the head sizes its "
                    f"CPU attention supports {list(VLLM_CPU_HEAD_SIZES)} (the tiny test pair has 16)")
    return None
