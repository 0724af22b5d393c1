"""Stub causal LMs for SD tests: bigram tables (exact, enumerable distributions) and perturbed tiny Llamas."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from distillspec.models.tiny import tiny_llama
from distillspec.sd.sampling import process_logits


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a Markov chain with no layers, so the KV cache stays empty
    while the engine's ragged bookkeeping (mask, rows, positions) still runs."""

    def __init__(self, table: torch.Tensor, max_positions: int = 4096) -> None:
        super().__init__()
        self.register_buffer("table", table.float())
        self.config = SimpleNamespace(vocab_size=table.shape[0], max_position_embeddings=max_positions)

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, **_):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=cache)


def log_table(probs: torch.Tensor) -> torch.Tensor:
    """Bigram logits from a (V, V) or (V,) probability table (rows broadcast), -inf where p = 0."""
    if probs.dim() == 1:
        probs = probs[None].expand(probs.shape[0], -1)
    return probs.clamp_min(0).log()


def perturbed_pair(vocab: int = 104, layers: int = 2, noise: float = 0.02, seed: int = 0, hidden: int = 64):
    """(draft, target): a tiny Llama and a copy with Gaussian weight noise (partial acceptance)."""
    target = tiny_llama(vocab, layers, seed=seed, hidden=hidden)
    draft = tiny_llama(vocab, layers, seed=seed, hidden=hidden)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for prm in draft.parameters():
            prm.add_(noise * torch.randn(prm.shape, generator=g))
    return draft, target


def ragged_prompts(lengths, vocab: int = 104, seed: int = 0, low: int = 4):
    """Left-padded random prompts: (B, L) ids (pad 0) and mask."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, L - n:] = torch.randint(low, vocab, (n,), generator=g)
        mask[i, L - n:] = 1
    return ids, mask


@torch.no_grad()
def exact_sequence_probs(model, prompt: torch.Tensor, length: int, temperature: float, top_p: float) -> dict:
    """Probability of every continuation of `length` tokens under the processed sampling distribution."""
    V = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=length)), dtype=torch.long)
    ids = torch.cat([prompt[None].expand(len(seqs), -1), seqs], 1)
    logits = model(input_ids=ids, use_cache=False).logits[:, prompt.numel() - 1: -1]
    probs = process_logits(logits, temperature, top_p)
    lp = probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    return {tuple(s.tolist()): float(v) for s, v in zip(seqs, lp)}
