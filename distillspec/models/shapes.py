"""Model shapes without weights: the configs of the project's full-size pairs, kept in the repo.

`distillspec/models/configs/<shape>.json` holds the upstream `config.json` of each model the reference
experiments use. They serve two purposes, neither of which downloads anything:
  * memory planning (`python run.py stage=plan ...`): parameter counts from a config, by building the
    model on the `meta` device (no memory, no weights);
  * the GPU check (`benchmarks/gpu_check.py`): real-size models with random weights, built directly on
    the GPU in the wanted dtype.
Only torch and transformers are imported here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from distillspec.errors import ConfigError, check_choice

CONFIG_DIR = Path(__file__).with_name("configs")
# shape name -> the model ids it stands for (Hub ids of the pairs in conf/pair/, and the offline target)
SHAPES = {
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B",),
    "qwen3-4b": ("Qwen/Qwen3-4B",),
    "smollm-360m": ("HuggingFaceTB/SmolLM-360M-Instruct", "HuggingFaceTB/SmolLM-360M"),
    "smollm-1.7b": ("HuggingFaceTB/SmolLM-1.7B-Instruct", "HuggingFaceTB/SmolLM-1.7B"),
    "smollm2-135m": ("offline:smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
_OFFLINE_DRAFT = re.compile(r"offline:smollm2-135m-L(\d+)(?:-warm)?")  # -L4-warm: the distilled 4-layer draft


def shape_config(shape: str, **overrides):
    """transformers config of a repo shape (`SHAPES`), with field overrides (e.g. num_hidden_layers=2)."""
    from transformers import AutoConfig

    check_choice("model shape", shape, SHAPES)
    data = {k: v for k, v in json.loads((CONFIG_DIR / f"{shape}.json").read_text()).items()
            if not k.startswith("_") and k != "architectures"}
    data.update(overrides)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def shape_of(model_name: str) -> str | None:
    """The repo shape a model name stands for, or None."""
    for shape, names in SHAPES.items():
        if model_name in names:
            return shape
    return None


def config_for(model_name: str):
    """Config of a model name (see distillspec.models.loading) without loading weights.

    Repo shapes answer at once (no network); `offline:smollm2-135m-L<n>` is the 135M shape with n layers;
    local directories and the tiny pair read their config.json; other Hub ids need the Hub or the HF cache.
    """
    from transformers import AutoConfig

    from distillspec.models.loading import check_model_name, resolve_model_path

    check_model_name(model_name)
    if (shape := shape_of(model_name)) is not None:
        return shape_config(shape)
    if m := _OFFLINE_DRAFT.fullmatch(model_name):
        return shape_config("smollm2-135m", num_hidden_layers=int(m.group(1)))
    path = resolve_model_path(model_name)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"no config for {model_name!r} without the Hub (known shapes: "
                          f"{', '.join(n for names in SHAPES.values() for n in names)}); error: {e}") from e


@dataclass
class ParamCount:
    """Parameter counts of a model. total counts tied weights once; head: the output projection's
    parameters when untied (0 when tied to the embedding); matrices_per_layer: (in, out) of the linear
    layers LoRA adapts in one decoder layer."""

    total: int
    embedding: int
    head: int
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    matrices_per_layer: tuple[tuple[int, int], ...]


def meta_model(config):
    """The model of `config` on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config) -> ParamCount:
    """Parameter counts of `config`'s causal LM, from a meta-device build (no weights allocated)."""
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    emb_w, head_w = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    head = 0 if head_w is emb_w else head_w.numel()
    layer = model.model.layers[0]
    mats = tuple((m.in_features, m.out_features) for name, m in layer.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_MODULES)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ParamCount(total=int(total), embedding=int(emb_w.numel()), head=int(head), num_layers=int(config.num_hidden_layers),
                      hidden=int(config.hidden_size), intermediate=int(config.intermediate_size),
                      vocab=int(config.vocab_size), kv_dim=int(config.num_key_value_heads * head_dim),
                      matrices_per_layer=mats)


# The projections distillspec's LoRA adapts (distillspec.lit.train_loop.apply_lora).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_random(config, *, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A randomly initialised causal LM of `config`, allocated directly on `device` in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)
