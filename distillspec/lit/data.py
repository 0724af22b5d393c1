"""Prompt batches: left-padded token tensors for decoding and rollouts."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists. Returns input_ids (B, L) long and attention_mask (B, L) long (1 = token)."""
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


class IndexDataset(Dataset):
    """Yields indices into a list of encoded items (the items stay on the module/host side)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class PromptCollator:
    """Collate item indices into {input_ids (B,L), attention_mask (B,L), index (B,)} (left padding)."""

    def __init__(self, items: Sequence[Any], pad_id: int) -> None:
        self.items, self.pad_id = items, pad_id

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([self.items[i].input_ids for i in indices], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor(indices, dtype=torch.long)}


def prompt_loader(items: Sequence[Any], batch_size: int, pad_id: int, *, shuffle: bool = False,
                  seed: int = 0, drop_last: bool = False) -> DataLoader:
    """DataLoader over encoded prompt items (objects with `.input_ids`); seeded shuffling."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(IndexDataset(len(items)), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, collate_fn=PromptCollator(items, pad_id), num_workers=0)
