"""Teacher work done once per prompt: completions and sparse next-token distributions, reused every epoch.

For the `teacher` and `fixed` data sources nothing about the teacher changes between steps (it is frozen),
so the teacher's completion of a prompt (`teacher`: sampled once; `fixed`: the dataset's output) and the
teacher's top-k log-probabilities at every completion position can be computed once and reused. Training
steps on cached data then run the student alone, against the sparse teacher of distillspec.losses.sparse.

Teacher samples come from the KV-cached decoding loop with a logits hook, so their distributions cost no
extra teacher forward; dataset completions take one teacher forward per batch. Every prompt is processed in
fixed batches from one seeded generator, so the cache is a pure function of (items, settings, seed): a
resumed run rebuilds exactly the cache it had.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from distillspec.rollout.sequences import CachedCompletion, Rollout, assemble, fixed_completions  # noqa: F401

log = logging.getLogger(__name__)


@dataclass
class SparseRollout(Rollout):
    """A Rollout with the teacher's sparse distributions: topk_idx (B, T, k) long, topk_logp (B, T, k) and
    tail_logp (B, T) float32."""

    topk_idx: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    tail_logp: torch.Tensor | None = None


def _topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., V) logits -> (top-k log-probs at `temperature`, their ids, log-sum-exp of the other log-probs),
    sorted by probability; computed in float32 (float64 for float64 logits)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        x = x / temperature
    lp = torch.log_softmax(x, -1)
    vals, idx = lp.topk(min(k, x.shape[-1]), -1)
    tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return vals, idx, tail


class TeacherCache:
    """Cached teacher completions and sparse distributions for a list of encoded prompts.

    Args:
        items: encoded prompts (`.input_ids`, `.target_ids`). source: "teacher" (sample once) or "fixed"
        (dataset outputs). top_k: teacher tokens kept per position. temperature: the objective's
        (loss) temperature the log-probs are taken at. sample_temperature, top_p: the rollout sampling
        settings (teacher source). max_new_tokens: completion cap. eos_ids, pad_id: token ids.
    """

    def __init__(self, items: Sequence, source: str, *, top_k: int, temperature: float, sample_temperature: float,
                 top_p: float, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> None:
        if source not in ("teacher", "fixed"):
            raise ValueError(f"TeacherCache serves the 'teacher' and 'fixed' sources, not {source!r}")
        self.items, self.source, self.top_k = items, source, top_k
        self.temperature, self.sample_temperature, self.top_p = temperature, sample_temperature, top_p
        self.max_new_tokens, self.eos_ids, self.pad_id = max_new_tokens, eos_ids, pad_id
        self.entries: dict[int, CachedCompletion] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def settings(self, seed: int, batch_size: int) -> dict:
        """Everything besides the prompts and the teacher that the cache's contents depend on."""
        return {"source": self.source, "top_k": self.top_k, "temperature": self.temperature,
                "sample_temperature": self.sample_temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id,
                "seed": int(seed), "batch_size": int(batch_size)}

    @torch.no_grad()
    def build(self, teacher, device: torch.device, seed: int, batch_size: int = 16, progress: bool = True,
              store: Path | None = None, engine=None, engine_args: Sequence[str] = (),
              load_teacher: Callable[[], torch.nn.Module] | None = None) -> None:
        """Fill the cache for every item (batches of `batch_size` prompts in item order, one generator).
        With `store` (a directory), load the entries a job with identical inputs stored there, or compute and
        store them (distillspec.rollout.cache_store). `engine`: a served teacher (an EngineClient of
        distillspec.serving.client) makes the entries instead of `teacher` in this process; the store key
        records it, its vLLM version and `engine_args` (the server's extra arguments, e.g. another --seed).
        `teacher` still names the weights: the served model is checked to be it
        (distillspec.rollout.engine.verify_served_teacher). `teacher` may be a ServedTarget (the target measured,
        not loaded here: distillspec.teacherless); entries that are neither stored nor served are then computed
        with the model `load_teacher()` returns."""
        from distillspec.rollout import cache_store
        from distillspec.rollout.target_probe import ServedTarget, logits_dim, weights_fingerprint

        path = None
        settings = self.settings(seed, batch_size)
        if engine is not None:  # served data depends on the server too: its vLLM version and the extra arguments
            settings.update(engine="vllm", vllm_version=engine.version(),
                            engine_args=[str(a) for a in engine_args])
        if store is not None:
            key = cache_store.cache_key(settings, self.items, weights_fingerprint(teacher), device)
            path = Path(store) / f"{key}.pt"
            stored = cache_store.load(path)
            if stored is not None and set(stored) == set(range(len(self.items))):
                self.entries = {i: CachedCompletion(**e) for i, e in stored.items()}
                log.info("teacher data (%s, %d prompts) loaded from %s", self.source, len(self.items), path)
                return
        if engine is not None:
            from distillspec.rollout.served_teacher import served_entries

            vocab = logits_dim(teacher)  # teacher: a model, or a ServedTarget (not loaded here)
            self.entries = served_entries(engine, self.items, self.source, top_k=min(self.top_k, vocab),
                                          sample_temperature=self.sample_temperature, top_p=self.top_p,
                                          max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids,
                                          batch_size=batch_size, progress=progress)
        else:
            late = load_teacher is not None and isinstance(teacher, ServedTarget)
            partial = cache_store.partial_path(path) if path is not None else None
            self._compute(load_teacher() if late else teacher, device, seed, batch_size, progress, partial)
        if path is not None:
            cache_store.save(path, {i: vars(e) for i, e in self.entries.items()})
            if engine is None:
                cache_store.drop_partial(path)

    def _compute(self, teacher, device: torch.device, seed: int, batch_size: int, progress: bool,
                 partial: Path | None = None) -> None:
        """Make the entries batch by batch with one generator; with `partial` (a store file), keep each batch
        there as it is done and go on from a killed build's last batch (cache_store.save_partial)."""
        from tqdm.auto import tqdm

        from distillspec.lit.data import left_pad
        from distillspec.rollout import cache_store

        was_training = teacher.training
        teacher.eval()
        gen = torch.Generator(device=device).manual_seed(seed)
        n = len(self.items)
        first = self._resume(partial, gen, batch_size) if partial is not None else 0
        what = "teacher rollouts" if self.source == "teacher" else "teacher scores of dataset outputs"
        bar = tqdm(total=n, initial=first, desc=f"{what} (once, cached)", unit="prompt", disable=not progress,
                   leave=False)
        for start in range(first, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            ids, mask = left_pad([self.items[i].input_ids for i in idx], self.pad_id)
            ids, mask = ids.to(device), mask.to(device)
            if self.source == "teacher":
                comp, lengths, t_idx, t_val, t_tail = self._sample(teacher, ids, mask, gen)
            else:
                comp, lengths, t_idx, t_val, t_tail = self._score_fixed(teacher, ids, mask, idx, device)
            for row, i in enumerate(idx):
                n_tok = int(lengths[row])
                self.entries[i] = CachedCompletion(tokens=comp[row, :n_tok].cpu(),
                                                   topk_idx=t_idx[row, :n_tok].to(torch.int32).cpu(),
                                                   topk_logp=t_val[row, :n_tok].float().cpu(),
                                                   tail_logp=t_tail[row, :n_tok].float().cpu())
            bar.update(len(idx))
            if partial is not None and idx[-1] < n - 1:
                cache_store.save_partial(partial, {i: vars(self.entries[i]) for i in range(idx[-1] + 1)},
                                         gen.get_state())
        bar.close()
        teacher.train(was_training)

    def _resume(self, partial: Path, gen: torch.Generator, batch_size: int) -> int:
        """The first item to compute: after the whole batches a killed build kept in `partial` (loaded into
        self.entries, `gen` set to its state after them), else 0."""
        from distillspec.rollout import cache_store

        kept = cache_store.load_partial(partial)
        if kept is None:
            return 0
        entries, state = kept
        done = len(entries)
        if set(entries) != set(range(done)) or done % batch_size or done >= len(self.items):
            log.warning("ignoring %s: %d entries do not make whole batches of %d before the last", partial, done,
                        batch_size)
            return 0
        self.entries = {i: CachedCompletion(**e) for i, e in entries.items()}
        gen.set_state(state)
        log.info("teacher data: %d of %d prompts kept by an interrupted build (%s); going on from there", done,
                 len(self.items), partial)
        return done

    def _sample(self, teacher, ids, mask, gen):
        from distillspec.sd.baseline import autoregressive_generate

        B, T = ids.shape[0], self.max_new_tokens
        k = min(self.top_k, teacher.get_output_embeddings().weight.shape[0])
        t_idx = torch.zeros(B, T, k, dtype=torch.long, device=ids.device)
        t_val = torch.zeros(B, T, k, dtype=torch.float32, device=ids.device)
        t_tail = torch.zeros(B, T, dtype=torch.float32, device=ids.device)

        def hook(rows: torch.Tensor, t: int, logits: torch.Tensor) -> None:
            vals, top, tail = _topk(logits, k, self.temperature)
            t_val[rows, t], t_idx[rows, t], t_tail[rows, t] = vals.float(), top, tail.float()

        res = autoregressive_generate(teacher, ids, mask, T, temperature=self.sample_temperature, top_p=self.top_p,
                                      generator=gen, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                      logits_hook=hook)
        return res.tokens, res.lengths, t_idx, t_val, t_tail

    def _score_fixed(self, teacher, ids, mask, idx, device):
        from distillspec.models.forward import completion_logits

        comp, lengths = fixed_completions([self.items[i].target_ids for i in idx], self.max_new_tokens,
                                          self.eos_ids[0], device)
        roll = assemble(ids, mask, comp, lengths, self.pad_id, "fixed")
        vals, top, tail = _topk(completion_logits(teacher, roll), self.top_k, self.temperature)
        return comp, lengths, top, vals, tail

    def rollout(self, indices: Sequence[int], device: torch.device) -> SparseRollout:
        """The cached completions of items `indices` as a SparseRollout (prompts left-padded, completions
        right-padded; topk tensors zero-padded past each length, where the completion mask is False)."""
        from distillspec.lit.data import left_pad

        missing = [i for i in indices if i not in self.entries]
        if missing:
            raise KeyError(f"teacher cache has no entry for items {missing[:5]}; call build() first")
        entries = [self.entries[i] for i in indices]
        ids, mask = left_pad([self.items[i].input_ids for i in indices], self.pad_id)
        width = max(e.length for e in entries)
        k = entries[0].topk_idx.shape[-1]
        comp = torch.full((len(entries), width), self.pad_id, dtype=torch.long)
        t_idx = torch.zeros(len(entries), width, k, dtype=torch.long)
        t_val = torch.zeros(len(entries), width, k, dtype=torch.float32)
        t_tail = torch.zeros(len(entries), width, dtype=torch.float32)
        for r, e in enumerate(entries):
            comp[r, : e.length] = e.tokens
            t_idx[r, : e.length] = e.topk_idx.long()
            t_val[r, : e.length] = e.topk_logp
            t_tail[r, : e.length] = e.tail_logp
        lengths = torch.tensor([e.length for e in entries], dtype=torch.long)
        base = assemble(ids.to(device), mask.to(device), comp.to(device), lengths.to(device), self.pad_id,
                        self.source)
        return SparseRollout(**vars(base), topk_idx=t_idx.to(device), topk_logp=t_val.to(device),
                             tail_logp=t_tail.to(device))
