"""distillspec.rollout.teacher_cache: teacher work done once per prompt equals recomputing it every step."""

from __future__ import annotations

import pytest
import torch

from distillspec.losses.divergences import divergence_loss
from distillspec.losses.sparse import sparse_divergence_loss
from distillspec.models.forward import completion_logits
from distillspec.models.loading import PairSpec
from distillspec.defaults import build_spec
from distillspec.rollout.sources import RolloutSampler
from distillspec.rollout.teacher_cache import SparseRollout, TeacherCache
from distillspec.specs import RolloutSpec
from distillspec.tasks.base import PromptBatchItem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    draft_dir, target_dir = tiny_pair_dirs
    return build_spec(PairSpec, draft=str(draft_dir), target=str(target_dir), dtype="float64").load("cpu")


def items(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(5, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        target = torch.randint(5, 60, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        out.append(PromptBatchItem(uid=str(i), input_ids=prompt, prompt_text="", reference=None, target_ids=target))
    return out


def cache(pair, source, k, temperature=1.0, seed=0, n=6):
    vocab = pair.target.get_output_embeddings().weight.shape[0]
    c = TeacherCache(items(n), source, top_k=min(k, vocab), temperature=temperature, sample_temperature=1.0,
                     top_p=1.0, max_new_tokens=7, eos_ids=[2], pad_id=0)
    c.build(pair.target, torch.device("cpu"), seed=seed, batch_size=4, progress=False)
    return c


@pytest.mark.parametrize("source", ["teacher", "fixed"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_cached_loss_equals_recomputed_teacher_loss(pair, source, temperature):
    """With k = V the cached sparse teacher gives the loss and gradient of a fresh teacher forward."""
    vocab = pair.target.get_output_embeddings().weight.shape[0]
    c = cache(pair, source, vocab, temperature)
    r = c.rollout([4, 0, 3], torch.device("cpu"))
    assert isinstance(r, SparseRollout) and r.source == source
    mask = r.completion_mask()
    with torch.no_grad():
        t_logits = completion_logits(pair.target, r)
    s_logits = completion_logits(pair.draft, r).detach().requires_grad_(True)
    for name in ("fkl", "rkl", "jsd", "tvd"):
        dense, _ = divergence_loss(s_logits, t_logits, mask, name, temperature=temperature, chunk_size=None)
        (gd,) = torch.autograd.grad(dense, s_logits)
        sparse, _ = sparse_divergence_loss(s_logits, r.topk_idx, r.topk_logp, mask, name,
                                           temperature=temperature, chunk_size=None, tail_logp=r.tail_logp)
        (gs,) = torch.autograd.grad(sparse, s_logits)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs, gd, rtol=1e-5, atol=1e-6)


def test_fixed_cache_holds_the_dataset_outputs(pair):
    c = cache(pair, "fixed", 4)
    its = items()
    for i, it in enumerate(its):
        assert c.entries[i].tokens.tolist() == it.target_ids + [2]  # EOS appended
        assert c.entries[i].topk_idx.shape == (len(it.target_ids) + 1, 4)


def test_cache_is_a_pure_function_of_its_seed(pair):
    a, b, other = cache(pair, "teacher", 5, seed=3), cache(pair, "teacher", 5, seed=3), cache(pair, "teacher", 5, seed=4)
    assert all(torch.equal(a.entries[i].tokens, b.entries[i].tokens) for i in range(6))
    assert all(torch.equal(a.entries[i].topk_logp, b.entries[i].topk_logp) for i in range(6))
    assert any(not torch.equal(a.entries[i].tokens, other.entries[i].tokens) for i in range(6))


def test_sampler_serves_cached_sources_and_samples_the_rest(pair):
    spec = build_spec(RolloutSpec, source="mixed", mix={"student": 0.5, "teacher": 0.5}, cache_top_k=8)
    sampler = RolloutSampler(spec, pair.draft, pair.target, [2], 0, 7)
    assert sampler.cached_sources() == ["teacher"]
    its = items()
    sampler.build_caches(its, torch.device("cpu"), seed=0, temperature=1.0, progress=False)
    from distillspec.lit.data import left_pad

    ids, mask = left_pad([its[i].input_ids for i in (1, 2)], 0)
    seen = set()
    for s in range(20):
        r = sampler.sample(ids, mask, [None, None], torch.Generator().manual_seed(s), indices=[1, 2])
        seen.add((r.source, isinstance(r, SparseRollout)))
    assert seen == {("student", False), ("teacher", True)}
    off = RolloutSampler(build_spec(RolloutSpec, source="teacher", cache_top_k=0), pair.draft, pair.target, [2], 0, 7)
    assert off.cached_sources() == []


class _NoForward(torch.nn.Module):
    """Wraps a model's weights (same fingerprint) but fails if it is ever run."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def named_parameters(self, *a, **k):
        return self.inner.named_parameters(*a, **k)

    def named_buffers(self, *a, **k):
        return self.inner.named_buffers(*a, **k)

    def forward(self, *a, **k):
        raise AssertionError("the teacher ran although its data was stored")


def stored_cache(pair, store, teacher=None, seed=0, n=6):
    c = TeacherCache(items(n), "teacher", top_k=5, temperature=1.0, sample_temperature=1.0, top_p=1.0,
                     max_new_tokens=7, eos_ids=[2], pad_id=0)
    c.build(teacher or pair.target, torch.device("cpu"), seed=seed, batch_size=4, progress=False, store=store)
    return c


def _same(a, b):
    return all(torch.equal(getattr(a.entries[i], f), getattr(b.entries[i], f))
               for i in a.entries for f in ("tokens", "topk_idx", "topk_logp", "tail_logp"))


def test_stored_teacher_data_is_reused_by_an_identical_job(pair, tmp_path):
    """A second job with the same inputs loads the first one's teacher data (the teacher never runs) and gets
    exactly the entries a fresh build gives; a different seed or prompt set gets its own entry."""
    first = stored_cache(pair, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = stored_cache(pair, tmp_path, teacher=_NoForward(pair.target))
    assert _same(first, again) and _same(first, cache(pair, "teacher", 5))
    stored_cache(pair, tmp_path, seed=1)
    stored_cache(pair, tmp_path, n=5)
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no temp files left


def test_changed_teacher_weights_change_the_key(pair, tmp_path):
    from distillspec.rollout.cache_store import model_fingerprint

    before = model_fingerprint(pair.target)
    p = next(pair.target.parameters())
    with torch.no_grad():
        p[0, 0] += 1e-3
    try:
        assert model_fingerprint(pair.target) != before
    finally:
        with torch.no_grad():
            p[0, 0] -= 1e-3


def test_a_killed_build_goes_on_from_its_last_batch(pair, tmp_path, monkeypatch):
    """Teacher data killed after its first batch keeps that batch (and the generator's state) in the store; the
    rerun computes only the rest and makes exactly the data of an uninterrupted build; the partial file goes."""
    whole = stored_cache(pair, tmp_path / "whole", n=10)  # batches of 4: items 0-3, 4-7, 8-9
    real, calls = TeacherCache._sample, []

    def killed_after_one_batch(self, *a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(TeacherCache, "_sample", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        stored_cache(pair, tmp_path / "store", n=10)
    kept = list((tmp_path / "store").glob("*.partial.pt"))
    assert len(kept) == 1 and not [p for p in (tmp_path / "store").glob("*.pt") if p not in kept]
    rows = []
    monkeypatch.setattr(TeacherCache, "_sample", lambda self, t, ids, *a: rows.append(len(ids)) or real(self, t, ids, *a))
    resumed = stored_cache(pair, tmp_path / "store", n=10)
    assert rows == [4, 2] and _same(resumed, whole) and sorted(resumed.entries) == list(range(10))
    assert not list((tmp_path / "store").glob("*.partial.pt")) and len(list((tmp_path / "store").glob("*.pt"))) == 1


def test_damaged_store_entry_is_rebuilt(pair, tmp_path, caplog):
    first = stored_cache(pair, tmp_path)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with caplog.at_level("WARNING"):
        rebuilt = stored_cache(pair, tmp_path)
    assert "unreadable" in caplog.text and str(path) in caplog.text
    assert _same(first, rebuilt)
    assert stored_cache(pair, tmp_path, teacher=_NoForward(pair.target)).entries  # stored again, loads


@pytest.mark.parametrize("div, teacher_logits, dense", [("fkl", "sparse", False), ("fkl", "dense", True),
                                                         ("adaptive", "sparse", True)])
def test_dense_teacher_scores_the_cached_completions(tiny_pair_dirs, div, teacher_logits, dense):
    """Teacher data is cached for every objective. With the sparse teacher the steps never run the teacher; with
    rollout.teacher_logits=dense, or an objective that needs full distributions (adaptive), each step runs the
    teacher once per micro-batch, on exactly the cached completions of that step's prompts."""
    import lightning as L
    from torch.utils.data import DataLoader

    from distillspec.lit.data import IndexDataset
    from distillspec.lit.train_module import DistillModule
    from distillspec.specs import ObjectiveSpec, TrainSpec
    from distillspec.defaults import build_spec

    draft_dir, target_dir = tiny_pair_dirs
    fresh = build_spec(PairSpec, draft=str(draft_dir), target=str(target_dir), dtype="float32").load("cpu")
    its = items(8)
    rollout = build_spec(RolloutSpec, source="teacher", cache_top_k=8, cache_store=False, teacher_logits=teacher_logits)
    train = build_spec(TrainSpec, max_steps=2, batch_size=2, num_train=8, warmup_steps=0, 
                       checkpoint_every=2, eval_every=0)
    objective = build_spec(ObjectiveSpec, divergence=div)
    module = DistillModule(fresh.draft, fresh.target, its, objective, rollout, train, [2], 0, 7)
    scored = []  # input_ids of the teacher's full-sequence (no KV cache) forwards: the training steps' scoring
    fresh.target.register_forward_hook(
        lambda mod, args, kwargs, out: scored.append(kwargs["input_ids"]) if kwargs.get("use_cache") is False
        else None, with_kwargs=True)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(IndexDataset(2), batch_size=None))
    assert module.dense_teacher is dense
    cache = module.sampler.caches["teacher"]
    assert len(cache) == 8
    if not dense:
        assert scored == []
        return
    expected = [cache.rollout(module.step_indices(step), torch.device("cpu")).input_ids for step in range(2)]
    assert len(scored) == len(expected) == 2  # one micro-batch of 2 prompts per step
    for got, want in zip(scored, expected):
        assert torch.equal(got, want)


def test_teacher_logits_must_be_sparse_or_dense():
    with pytest.raises(Exception, match=r"rollout.teacher_logits.*'full'.*sparse.*dense"):
        build_spec(RolloutSpec, source="teacher", teacher_logits="full")


def test_store_dir_follows_its_environment_variable(monkeypatch, tmp_path):
    from distillspec.rollout.cache_store import STORE_ENV, default_store_dir

    monkeypatch.setenv(STORE_ENV, str(tmp_path / "td"))
    assert default_store_dir() == tmp_path / "td"
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path / "root"))
    assert default_store_dir() == tmp_path / "root" / "teacher_data"


def _read_only(monkeypatch, store):
    """Writes under `store` fail as on a read-only file system (root ignores permission bits, so a chmod would
    not do): removing, creating and replacing files there raise OSError(EROFS); reads work."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    def guard(fn):
        def wrapped(*args, **kwargs):
            if any(str(a).startswith(str(store)) for a in list(args) + list(kwargs.values())):
                raise OSError(errno.EROFS, "Read-only file system", str(args[0] if args else store))
            return fn(*args, **kwargs)
        return wrapped

    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: guard(real_unlink)(self, *a, **k))
    monkeypatch.setattr(os, "unlink", guard(os.unlink))
    monkeypatch.setattr(os, "replace", guard(os.replace))
    monkeypatch.setattr(tempfile, "mkstemp", guard(tempfile.mkstemp))


def test_damaged_entry_in_a_read_only_store_is_reported_and_skipped(pair, tmp_path, monkeypatch, caplog):
    """A damaged entry in a store the run cannot write (another user's, a read-only mount) is rebuilt in memory
    with warnings; the run goes on (removing it raises OSError(EROFS))."""
    first = stored_cache(pair, tmp_path)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])
    _read_only(monkeypatch, tmp_path)
    with caplog.at_level("WARNING"):
        rebuilt = stored_cache(pair, tmp_path)
    assert _same(first, rebuilt)
    assert "unreadable" in caplog.text and "could not remove" in caplog.text and "could not store" in caplog.text
    assert path.stat().st_size == 100  # left as it was


@pytest.mark.parametrize("damage", ["missing field", "wrong shape", "not a dict"])
def test_entry_missing_a_field_is_rebuilt(pair, tmp_path, caplog, damage):
    """An entry that loads but lacks a field (or has mismatched shapes) is unreadable like a truncated one:
    reported and rebuilt, not a `TypeError: CachedCompletion.__init__() missing ...`."""
    from distillspec.rollout import cache_store

    first = stored_cache(pair, tmp_path)
    (path,) = tmp_path.glob("*.pt")
    entries = torch.load(path, weights_only=True)["entries"]
    if damage == "missing field":
        del entries[3]["tail_logp"]
    elif damage == "wrong shape":
        entries[3]["topk_logp"] = entries[3]["topk_logp"][:-1]
    else:
        entries[3] = [1, 2]
    cache_store.save(path, entries)
    with caplog.at_level("WARNING"):
        rebuilt = stored_cache(pair, tmp_path)
    assert "unreadable" in caplog.text and "entry 3" in caplog.text
    assert _same(first, rebuilt)
    assert stored_cache(pair, tmp_path, teacher=_NoForward(pair.target)).entries  # stored whole again


def test_store_entries_are_readable_by_other_users(pair, tmp_path):
    """An entry gets the umask's mode (not mkstemp's 0600), so other users of a shared store read it."""
    import os

    old = os.umask(0o022)
    try:
        stored_cache(pair, tmp_path)
    finally:
        os.umask(old)
    (path,) = tmp_path.glob("*.pt")
    assert path.stat().st_mode & 0o777 == 0o644
