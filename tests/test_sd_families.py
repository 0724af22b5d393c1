"""The family matrix: tiny random models of each family users bring to SD (distillspec.models.tiny_families),
sliding windows of 6 positions crossed by every generation. Per family: greedy SD equals greedy target decoding
on a ragged batch (both KV caches), the teacher cache is made and equals a fresh teacher forward, one training
step, and the vocabulary checks (sizes, padded logit rows, Gemma 2's soft-capped logits)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distillspec.errors import ConfigError
from distillspec.losses.sparse import sparse_divergence_loss
from distillspec.models.forward import completion_logits
from distillspec.models.loading import check_same_vocab, logits_dim
from distillspec.models.tiny_families import (FAMILIES, GEMMA2_SOFTCAP, PADDED, SLIDING, VOCAB, WINDOW,
                                              build_char_tokenizer, perturbed_copy, tiny_family_model)
from distillspec.rollout.teacher_cache import TeacherCache, _topk
from distillspec.sd.cache import RaggedKV
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.sd.static_cache import make_kv
from distillspec.tasks.base import PromptBatchItem
from tests.sd_stubs import BigramLM, ragged_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [3, 9, 1, 14, 6, 11]
NEW_TOKENS = 20  # > WINDOW: every row's generation crosses the window
EOS = 1


def _rows(result):
    return [result.tokens[i, : int(result.lengths[i])].tolist() for i in range(result.lengths.shape[0])]


def _hf_greedy(model, ids, mask, n):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)[:, ids.shape[1]:]
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in out.tolist()]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, one_thread):
    """One family's target, its noisy-copy draft, tokenizer, a ragged batch and HF's greedy decoding of it;
    its teacher cache is added by the first test that needs it."""
    target = tiny_family_model(request.param)
    ids, mask = ragged_prompts(LENGTHS, vocab=VOCAB)
    return SimpleNamespace(name=request.param, target=target, draft=perturbed_copy(target, 0.01),
                           tok=build_char_tokenizer(), ids=ids, mask=mask,
                           ref=_hf_greedy(target, ids, mask, NEW_TOKENS), cache=None)


def test_greedy_sd_equals_target_greedy(fam):
    for kv in ("dynamic", "static"):
        res = SpeculativeDecoder(fam.draft, fam.target, gamma=4, temperature=0, eos_token_id=EOS, pad_token_id=0,
                                 kv=kv).generate(fam.ids, fam.mask, NEW_TOKENS)
        assert _rows(res) == fam.ref, kv
    alpha = float(res.num_accepted.sum() / res.num_drafted.sum())
    assert 0.05 < alpha < 0.999  # partial acceptance: per-row holes and rollbacks were exercised
    assert max(len(r) for r in fam.ref) > WINDOW + 1


def test_the_window_shapes_the_output(fam):
    """A decoder that ignored the window would fail the equality above: with the window widened to the whole
    context, our engine decodes something else (sliding families only)."""
    if fam.name not in SLIDING:
        pytest.skip("no sliding-window layers")
    cfg = fam.target.config.get_text_config()
    cfg.sliding_window = 10_000
    try:
        res = SpeculativeDecoder(fam.target, fam.target, gamma=4, temperature=0, eos_token_id=EOS,
                                 pad_token_id=0).generate(fam.ids, fam.mask, NEW_TOKENS)
    finally:
        cfg.sliding_window = WINDOW
    assert _rows(res) != fam.ref


def test_batched_equals_per_row(fam):
    """Sliding families: a row decoded alone gives the batch's tokens and acceptance counts (the 1- and the
    14-token prompt)."""
    if fam.name not in SLIDING:
        pytest.skip("no sliding-window layers")
    dec = SpeculativeDecoder(fam.draft, fam.target, gamma=4, temperature=0, eos_token_id=EOS, pad_token_id=0)
    batched = dec.generate(fam.ids, fam.mask, NEW_TOKENS)
    for i in (2, 3):
        n = LENGTHS[i]
        single = dec.generate(fam.ids[i:i + 1, -n:], fam.mask[i:i + 1, -n:], NEW_TOKENS)
        assert _rows(single)[0] == _rows(batched)[i]
        assert int(single.num_accepted[0]) == int(batched.num_accepted[i])


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_holes_do_not_shift_the_window(fam, kv):
    """Rejected columns (holes) between a row's tokens: the next token's logits equal those of a cache that
    never held them, past the window. Row 0 holds 3 rejected columns as holes, row 1 keeps them as tokens."""
    prompt = fam.ids[3:4, -10:].expand(2, -1)  # 10 tokens: longer than the window
    junk, nxt = torch.tensor([[7, 8, 9]]).expand(2, -1), torch.tensor([[11], [11]])
    ar = torch.arange(10)[None].expand(2, -1)
    cache = make_kv(fam.target, 2, torch.device("cpu"), kv=kv, capacity=32)
    cache.forward(prompt, torch.ones_like(prompt), ar)
    cache.forward(junk, torch.ones_like(junk), 10 + torch.arange(3)[None].expand(2, -1))
    cache.set_valid(10, torch.tensor([[0, 0, 0], [1, 1, 1]]))
    got = cache.forward(nxt, torch.ones_like(nxt), torch.tensor([[10], [13]]))[:, -1]
    with torch.no_grad():
        ref0 = fam.target(input_ids=torch.cat([prompt[:1], nxt[:1]], 1)).logits[0, -1]
        ref1 = fam.target(input_ids=torch.cat([prompt[1:], junk[1:], nxt[1:]], 1)).logits[0, -1]
    torch.testing.assert_close(got, torch.stack([ref0, ref1]), atol=1e-4, rtol=1e-4)


def _items(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [PromptBatchItem(uid=str(i), input_ids=torch.randint(4, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),),
                                                                generator=g).tolist(),
                            prompt_text="", reference=None, target_ids=None) for i in range(n)]


def _teacher_cache(fam):
    """Teacher samples (T = 1) of 5 prompts; the EOS is a token the first row samples first after the window,
    so rows finish at different steps."""
    if fam.cache is None:
        def build(eos_ids):
            cache = TeacherCache(_items(), "teacher", top_k=8, temperature=1.0, sample_temperature=1.0, top_p=1.0,
                                 max_new_tokens=14, eos_ids=eos_ids, pad_id=0)
            cache.build(fam.target, torch.device("cpu"), seed=0, batch_size=5, progress=False)
            return cache

        first = build([EOS]).entries[0].tokens.tolist()
        fam.cache = build([EOS, next(t for k, t in enumerate(first) if k > WINDOW and t not in first[:k])])
    return fam.cache


def test_teacher_cache_is_made_and_equals_a_fresh_teacher_forward(fam):
    """The cached top-k log-probs (from the KV-cached decoding loop, rows finishing at different steps) equal
    the teacher's forward over the whole sequence (no cache, transformers' own masks)."""
    cache = _teacher_cache(fam)
    assert len(cache) == 5
    roll = cache.rollout(range(5), torch.device("cpu"))
    assert int(roll.lengths.max()) > WINDOW and int(roll.lengths.min()) < int(roll.lengths.max())
    with torch.no_grad():
        vals, idx, _ = _topk(completion_logits(fam.target, roll), 8, 1.0)
    m = roll.completion_mask()
    torch.testing.assert_close(roll.topk_logp[m], vals[m], atol=2e-4, rtol=1e-4)
    assert (roll.topk_idx[m][:, 0] == idx[m][:, 0]).all()


def test_one_training_step(fam):
    """One AdamW step of a draft far enough from the teacher on its cached data: finite gradients, lower loss."""
    draft = perturbed_copy(fam.target, 0.1, seed=2).train().requires_grad_(True)
    roll = _teacher_cache(fam).rollout(range(5), torch.device("cpu"))
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss, _ = sparse_divergence_loss(completion_logits(draft, roll), roll.topk_idx, roll.topk_logp,
                                         roll.completion_mask(), "fkl", tail_logp=roll.tail_logp)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in draft.parameters() if p.grad is not None)
        opt.step()
    assert losses[1] < losses[0]


def test_vocabulary_checks(fam):
    tok = fam.tok
    dim = logits_dim(fam.target)
    assert dim == logits_dim(fam.draft) == fam.target.config.get_text_config().vocab_size
    assert dim > len(tok) if fam.name in PADDED else dim == len(tok)  # padded rows beyond the tokenizer
    check_same_vocab(fam.draft, fam.target, tok, tok, "draft", "target")
    other = BigramLM(torch.zeros(dim + 8, dim + 8))
    with pytest.raises(ConfigError, match="different vocabulary sizes"):
        check_same_vocab(other, fam.target, tok, tok, "draft", "target")
    with pytest.raises(ConfigError, match=f"{dim + 8}.*{dim}|{dim}.*{dim + 8}"):
        SpeculativeDecoder(other, fam.target)


def test_gemma2_soft_capped_logits_are_what_sd_and_training_see(fam):
    if fam.name != "gemma2":
        pytest.skip("Gemma 2 only")
    kv = RaggedKV(fam.target, 1, torch.device("cpu"))
    ids = fam.ids[3:4]  # the 14-token prompt, longer than the window
    pos = torch.arange(ids.shape[1])[None]
    cached = kv.forward(ids, torch.ones_like(ids), pos)
    with torch.no_grad():
        full = fam.target(input_ids=ids).logits
        fam.target.config.final_logit_softcapping = None
        raw = fam.target(input_ids=ids).logits
        fam.target.config.final_logit_softcapping = GEMMA2_SOFTCAP
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, GEMMA2_SOFTCAP * torch.tanh(raw / GEMMA2_SOFTCAP), atol=1e-5, rtol=1e-5)
    assert float(raw.abs().max()) > GEMMA2_SOFTCAP > float(full.abs().max())  # the cap bends these logits
