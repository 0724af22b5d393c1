"""Which model architectures the SD engine decodes, decided from a model's config alone (imports no torch).

The engine's KV caches (distillspec.sd.cache, distillspec.sd.static_cache) keep every position's keys and
values in every layer and give each layer type its own per-row attention mask. Two layer types are
supported: "full_attention" and "sliding_attention" (each token attends to itself and the `sliding_window`
- 1 positions before it). Anything else is refused from the config, before a model loads or any teacher
data is made: chunked attention (Llama 4), linear-attention, convolution or state-space layers (Qwen3-Next,
LFM2, Mamba and its hybrids), KV caches shared between layers (Gemma 3n), bidirectional attention.

`problem(config)` takes a config.json dict or a transformers config object (its text config is used).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillspec.errors import ConfigError

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# model types whose layers keep a recurrent state instead of (or beside) a KV cache of attention layers
RECURRENT_MODEL_TYPES = ("bamba", "falcon_h1", "falcon_mamba", "granitemoehybrid", "jamba", "lfm2", "lfm2_moe",
                         "mamba", "mamba2", "minimax", "nemotron_h", "qwen3_next", "recurrent_gemma", "rwkv",
                         "xlstm", "zamba", "zamba2")
INSTEAD = ("use a draft and target whose layers are full or sliding-window attention (Llama, Qwen2/2.5/3, "
           "Gemma 2/3, Mistral, Phi-3, OLMo-2, gpt-oss)")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def text_config(cfg: Any) -> Any:
    """The decoder's config: `text_config` of a multimodal config, else the config itself."""
    if not isinstance(cfg, dict) and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config(decoder=True)
    inner = _get(cfg, "text_config")
    return inner if inner is not None else cfg


def layer_types(cfg: Any) -> set[str]:
    """The attention layer types of a (text) config: `layer_types`, else all sliding when `sliding_window` is
    set (Mistral, Phi-3; not Qwen2 with use_sliding_window false), chunked with `attention_chunk_size`."""
    types = _get(cfg, "layer_types")
    if types:
        return set(types)
    if _get(cfg, "sliding_window") is not None and _get(cfg, "use_sliding_window", True) is not False:
        return {"sliding_attention"}
    if _get(cfg, "attention_chunk_size") is not None:
        return {"chunked_attention"}
    return {"full_attention"}


def problem(config: Any) -> str | None:
    """Why the SD engine cannot decode a model of this config (None when it can)."""
    cfg = text_config(config)
    kind = _get(config, "model_type") or _get(cfg, "model_type") or "?"
    if kind in RECURRENT_MODEL_TYPES or _get(cfg, "model_type") in RECURRENT_MODEL_TYPES:
        return f"model_type {kind!r} has recurrent (state-space or linear-attention) layers, not a KV cache"
    other = sorted(layer_types(cfg) - set(SUPPORTED_LAYER_TYPES))
    if other:
        return (f"model_type {kind!r} has {', '.join(other)} layers; the engine's caches support "
                f"{' and '.join(SUPPORTED_LAYER_TYPES)} layers only")
    if _get(cfg, "use_bidirectional_attention"):
        return f"model_type {kind!r} has bidirectional attention (use_bidirectional_attention=true)"
    if _get(cfg, "num_kv_shared_layers") or _get(cfg, "kv_sharing_modes"):
        return f"model_type {kind!r} shares KV caches between layers"
    if _get(config, "is_encoder_decoder"):
        return f"model_type {kind!r} is an encoder-decoder model"
    return None


def check_config(config: Any, what: str) -> None:
    """ConfigError naming `what` (e.g. "pair.target: /models/x"), the reason and what to use instead."""
    reason = problem(config)
    if reason is not None:
        archs = _get(config, "architectures") or []
        label = f" ({', '.join(archs)})" if archs else ""
        raise ConfigError(f"{what}{label} cannot be decoded by the SD engine: {reason}; {INSTEAD}")


def check_model_dir(path: Path, what: str) -> None:
    """check_config on `path`/config.json when there is one (a tokenizer-only directory has none)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {file} is not readable JSON ({exc}); re-save or re-download the model") from None
    check_config(config, what)
