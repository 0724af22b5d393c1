"""Tiny random Llama models and a character-level tokenizer, built locally (no network).

Used by the tests and by `pair=tiny`: the whole pipeline runs in seconds on a CPU. The target has
`target_layers` decoder layers; the draft is the target cut to its first `draft_layers` layers
(the same construction as the offline SmolLM2 pair), so the two share a tokenizer exactly.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = [PAD, EOS, BOS, UNK]
# A chat template so the task code's chat path is exercised by the tiny pair too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII; vocab size 104 (4 specials + 100 chars)."""
    chars = [c for c in string.printable if c not in SPECIALS]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                 unk_token=UNK)
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def tiny_llama_config(vocab_size: int, num_layers: int, *, hidden: int = 64, heads: int = 4,
                      kv_heads: int = 2, max_positions: int = 4096) -> LlamaConfig:
    """A small Llama config (GQA, RoPE, tied embeddings) mirroring SmolLM2's architecture."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=num_layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=True, initializer_range=0.2,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tiny_llama(vocab_size: int = 104, num_layers: int = 2, *, seed: int = 0, hidden: int = 64,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (deterministic given `seed`), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size, num_layers, hidden=hidden))
    return model.to(dtype).eval()


def truncate_layers(model: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """A copy of `model` keeping embeddings, the first `num_layers` decoder layers, final norm and head."""
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers} must be in [1, {total}] for a {total}-layer model")
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = num_layers
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:num_layers]
    cfg.pop("quantization_config", None)
    small = type(model)(type(model.config).from_dict(cfg)).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    small.load_state_dict(state, strict=True)
    return small.eval()


def tiny_pair_dirs(out_dir: str | Path, *, target_layers: int = 4, draft_layers: int = 1, hidden: int = 64,
                   seed: int = 0) -> tuple[Path, Path]:
    """(draft_dir, target_dir) where build_tiny_pair writes the pair with these settings (nothing is built)."""
    out = Path(out_dir)
    return (out / f"tiny-draft-L{draft_layers}of{target_layers}-h{hidden}-s{seed}",
            out / f"tiny-target-L{target_layers}-h{hidden}-s{seed}")


def tiny_pair_built(draft_dir: Path, target_dir: Path) -> bool:
    """Both dirs hold a config and weights (each is renamed into place whole). Reads only."""
    return all((d / "config.json").is_file() and any(d.glob("*.safetensors")) for d in (draft_dir, target_dir))


def build_tiny_pair(out_dir: str | Path, *, target_layers: int = 4, draft_layers: int = 1,
                    hidden: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny target and its truncated draft (with tokenizer) under `out_dir`; return both dirs.

    Idempotent: existing complete directories are reused (without writing anything). Files get the umask's
    modes (transformers writes model.safetensors 0600), so a shared cache is readable by other users.
    """
    from distillspec.models.cache_files import share_tree

    draft_dir, target_dir = tiny_pair_dirs(out_dir, target_layers=target_layers, draft_layers=draft_layers,
                                           hidden=hidden, seed=seed)
    if tiny_pair_built(draft_dir, target_dir):
        return draft_dir, target_dir
    tok = build_char_tokenizer()
    target = tiny_llama(len(tok), target_layers, seed=seed, hidden=hidden)
    draft = truncate_layers(target, draft_layers)
    for model, d in ((target, target_dir), (draft, draft_dir)):
        tmp = d.with_name(d.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        share_tree(tmp)
        tmp.replace(d) if not d.exists() else None
    return draft_dir, target_dir
