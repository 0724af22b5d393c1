"""Greedy SD with the real offline pair (SmolLM2-135M target, its first 4 layers as the draft) is exact:
token for token the target's own greedy `generate`, on a ragged left-padded batch of GSM8K prompts.

The untrained 4-layer draft agrees with the target on few tokens, so most blocks end in a rejection and
rows accept different numbers of drafted tokens: the ragged cache paths (holes, crops, compaction, row
retirement at EOS / max_new_tokens) all run with real attention, rotary positions and fp32 numerics.
"""

from __future__ import annotations

import pytest
import torch

from distillspec.evaluation import eos_token_ids
from distillspec.lit.data import left_pad
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.tasks.gsm8k import GSM8KTask
from tests.test_offline_pair import offline_dirs, pair  # noqa: F401  (the offline pair fixtures, reused)

pytestmark = [pytest.mark.real_model]

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gsm8k_batch(pair, shared_data):  # noqa: F811
    """(input_ids, attention_mask, eos ids, pad id) for 3 GSM8K test prompts of different lengths."""
    task = GSM8KTask(source="local", path=str(shared_data / "gsm8k" / "test.jsonl"))
    items = task.encode(task.load("eval"), pair.tokenizer, limit=3, seed=0)
    assert len({len(it.input_ids) for it in items}) == 3, "want a ragged batch"
    pad = pair.tokenizer.pad_token_id
    ids, mask = left_pad([it.input_ids for it in items], pad)
    return ids, mask, eos_token_ids(pair.tokenizer, pair.target), pad


@pytest.fixture(scope="module")
def target_greedy(pair, gsm8k_batch):  # noqa: F811
    """The target's greedy continuations (HF generate on the same padded batch), cut after the first EOS."""
    ids, mask, eos, pad = gsm8k_batch
    with torch.no_grad():
        out = pair.target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:]
    rows = []
    for r in out.tolist():
        cut = next((k + 1 for k, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


@pytest.mark.parametrize("gamma", [pytest.param(1, marks=pytest.mark.slow), 3, 5,
                                   pytest.param(8, marks=pytest.mark.slow)])
def test_greedy_sd_equals_target_greedy(pair, gsm8k_batch, target_greedy, gamma):  # noqa: F811
    ids, mask, eos, pad = gsm8k_batch
    dec = SpeculativeDecoder(pair.draft, pair.target, gamma=gamma, temperature=0, eos_token_id=eos, pad_token_id=pad)
    res = dec.generate(ids, mask, NEW_TOKENS)
    got = [res.tokens[i, : int(res.lengths[i])].tolist() for i in range(ids.shape[0])]
    assert got == target_greedy
    assert all(len(r) >= 1 for r in got)
    # Every row was verified block by block; accepted counts are consistent with the emitted lengths.
    assert (res.num_accepted + res.num_blocks >= res.lengths).all()
    assert (res.num_accepted <= res.num_drafted).all() and (res.num_drafted == res.num_blocks * gamma).all()
