"""Tiny random models of the families users bring to SD, built by code (no download), for the family tests.

Each family's config keeps what makes the family itself (its layer types and sliding window, soft-capped
logits, QK norms, attention sinks and experts, padded vocabularies) at a size that decodes in milliseconds
on a CPU: hidden 64, 3 layers, the character tokenizer of distillspec.models.tiny (104 tokens). Sliding
windows are WINDOW = 6 positions, so a 20-token generation crosses them. Families marked padded have
PADDED_VOCAB logit rows, more than the tokenizer has (as Qwen2 and Phi-3 checkpoints do). gemma3_mm is the
Gemma 3 text model inside Gemma3ForConditionalGeneration (the 4B-27B checkpoints), with a 1-layer vision tower.
"""

from __future__ import annotations

import torch

from distillspec.models.tiny import build_char_tokenizer  # noqa: F401 (the families' tokenizer)

WINDOW = 6
VOCAB = 104  # the character tokenizer's size
PADDED_VOCAB = 112
FAMILIES = ("llama", "qwen2", "qwen2_sliding", "qwen3", "gemma2", "gemma3", "gemma3_mm", "mistral", "phi3", "olmo2",
            "gpt_oss")
PADDED = ("qwen2", "phi3")
GEMMA2_SOFTCAP = 0.5  # small, so the cap bends these random logits (Gemma 2 checkpoints: 30)
SLIDING = ("qwen2_sliding", "gemma2", "gemma3", "gemma3_mm", "mistral", "phi3", "gpt_oss")  # families whose tiny config has sliding layers


def family_config(family: str, num_layers: int = 3, *, vocab_size: int | None = None, window: int = WINDOW,
                  head_dim: int = 16):
    """The transformers config of `family`'s tiny model (ValueError for an unknown family); vocab_size
    defaults to VOCAB (PADDED_VOCAB for the padded families), window is the sliding window, head_dim 16 or 32
    (4 or 2 query heads of hidden size 64; vLLM's CPU build needs >= 32)."""
    import transformers as T

    vocab_size = vocab_size or (PADDED_VOCAB if family in PADDED else VOCAB)
    heads = 64 // head_dim
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                  max_position_embeddings=4096, initializer_range=0.2, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    mixed = ["sliding_attention", "full_attention"] * num_layers
    if family == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return T.Qwen2Config(**common)
    if family == "qwen2_sliding":  # use_sliding_window: sliding from layer max_window_layers on
        return T.Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=1)
    if family == "qwen3":
        return T.Qwen3Config(**common, head_dim=head_dim)
    if family == "gemma2":  # alternating sliding / full layers, attention and final logits soft-capped
        return T.Gemma2Config(**common, head_dim=head_dim, sliding_window=window, layer_types=mixed[:num_layers],
                              final_logit_softcapping=GEMMA2_SOFTCAP)
    if family == "gemma3":  # sliding layers with one full layer (5 of 6 sliding at full size)
        types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
        return T.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=window, layer_types=types)
    if family == "gemma3_mm":  # Gemma 3 4B-27B: the text model inside Gemma3ForConditionalGeneration
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        text = family_config("gemma3", num_layers, vocab_size=vocab_size, window=window, head_dim=head_dim)
        return T.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                              eos_token_id=1, pad_token_id=0)
    if family == "mistral":  # every layer sliding (Mistral-7B v0.1)
        return T.MistralConfig(**common, sliding_window=window)
    if family == "phi3":  # every layer sliding (Phi-3-mini), padded vocabulary
        return T.Phi3Config(**common, sliding_window=window)
    if family == "olmo2":
        return T.Olmo2Config(**common)
    if family == "gpt_oss":  # alternating sliding / full, attention sinks, mixture of experts, YaRN RoPE
        common.pop("max_position_embeddings")  # its default matches its YaRN factor
        return T.GptOssConfig(**common, head_dim=head_dim, sliding_window=window, layer_types=mixed[:num_layers],
                              num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def tiny_family_model(family: str, *, seed: int = 0, num_layers: int = 3, **config):
    """A randomly initialised tiny model of `family` (deterministic given `seed`), float32, in eval mode;
    config: family_config's vocab_size and window."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(family_config(family, num_layers, **config))
    if family.startswith("gemma"):  # Gemma scales its (tied) input embeddings by sqrt(hidden); undone here, or
        with torch.no_grad():       # random logits just repeat the input token
            model.get_input_embeddings().weight.mul_(model.config.get_text_config().hidden_size ** -0.5)
    return model.float().eval()


def perturbed_copy(model, noise: float, seed: int = 1):
    """A copy of `model` with Gaussian noise of std `noise` on every weight (a draft that partly agrees)."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in draft.parameters():
            prm.add_(noise * torch.randn(prm.shape, generator=g))
    return draft.eval()
