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
VLLM_ONE_LAYER_TYPE = ("qwen2", "qwen3")  # model types whose vLLM model takes one attention type for all layers
# model types that mix sliding and full layers whenever sliding_window is set (configs without layer_types)
VLLM_MIXED_MODEL_TYPES = ("cohere2", "gemma2", "gemma3", "gemma3_text", "gpt_oss")


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


def _text_config(model_dir: str | Path) -> dict | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg)


def mixed_layers_refusal(model_dir: str | Path, role: str) -> str | None:
    """Why vLLM 0.32 refuses the `role` ("target" or "draft") `model_dir` for its mix of sliding-window and full
    layers, or None (any device):
      * its Qwen2/Qwen3 model (`vllm/model_executor/models/qwen2.py`, Qwen2Model) asserts one attention type for
        all layers: sliding layers from `max_window_layers` on (use_sliding_window) die at start-up;
      * its draft_model proposer (`vllm/v1/spec_decode/llm_base_proposer.py`, validate_same_kv_cache_group)
        asserts that all draft layers share one KV cache group, and sliding and full layers get one each
        (Gemma 2, Gemma 3, gpt-oss, Cohere2 as drafts)."""
    cfg = _text_config(model_dir)
    if cfg is None:
        return None
    types = set(cfg.get("layer_types") or [])
    n, first = cfg.get("num_hidden_layers"), cfg.get("max_window_layers")
    if cfg.get("model_type") in VLLM_ONE_LAYER_TYPE and (len(types) > 1 or (
            not types and cfg.get("use_sliding_window") and n is not None and first is not None and 0 < first < n)):
        return (f"vLLM's {cfg['model_type']} model cannot serve the {role} {model_dir}: it has sliding-window layers "
                f"on some layers only (use_sliding_window with max_window_layers={first} < num_hidden_layers={n}), "
                "and that model takes one attention type for all layers")
    mixed = len(types) > 1 or (not types and cfg.get("model_type") in VLLM_MIXED_MODEL_TYPES
                               and cfg.get("sliding_window") is not None)
    if role == "draft" and mixed:
        kinds = ", ".join(sorted(types)) if types else "sliding_attention, full_attention"
        return (f"vLLM's draft_model SD cannot use {model_dir} as the draft: its layers are {kinds}, and vLLM needs "
                "all draft layers in one KV cache group")
    return None


def vision_refusal(model_dir: str | Path, role: str) -> str | None:
    """Why the serving env cannot load the `role` `model_dir`, or None: vLLM builds a multimodal model (a config
    with `vision_config`, e.g. Gemma3ForConditionalGeneration) with its vision tower, which imports torchvision,
    and `make vllm` removes torchvision (its CUDA build breaks `import vllm` on the CPU torch)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "vision_config" in cfg:
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
        return (f"the serving env cannot load the {role} {model_dir} ({arch}): vLLM builds its vision tower, which "
                "needs torchvision, and `make vllm` removes torchvision")
    return None


def vllm_refusal(model_dirs: dict[str, str | Path], cuda: bool) -> str | None:
    """Why vLLM cannot serve these models ({role: dir}, e.g. target and draft), or None when it can.

    The rules: vLLM's CPU build (cuda=False) runs only the head sizes in VLLM_CPU_HEAD_SIZES; its Qwen2/Qwen3
    model refuses sliding windows on some layers only, and its draft_model SD a draft that mixes sliding and
    full layers (`mixed_layers_refusal`); the serving env loads no multimodal model (`vision_refusal`).
    """
    for role, d in model_dirs.items():
        if why := mixed_layers_refusal(d, role) or vision_refusal(d, role):
            return why
    if cuda:
        return None
    for role, d in model_dirs.items():
        h = head_dim(d)
        if h is not None and h not in VLLM_CPU_HEAD_SIZES:
            return (f"vLLM's CPU build cannot serve the {role} {d}: head_dim {h} is not one of the head sizes its "
                    f"CPU attention supports {list(VLLM_CPU_HEAD_SIZES)} (the tiny test pair has 16)")
    return None
