"""Training sequences for distillation: fixed dataset outputs, student / teacher samples, mixtures, SKD.

Every source returns a `Rollout` (distillspec.rollout.sequences): the prompt (left-padded) followed by a
right-padded completion, and the completion lengths. Losses are computed on the distributions that predict
completion tokens: logit position L-1+j predicts completion token j (L = padded prompt width), for j < length
— which keeps the EOS itself (lengths count it) even when pad == eos, and drops everything after it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distillspec.errors import ConfigError
from distillspec.rollout.sequences import Rollout, assemble, fixed_completions
from distillspec.specs import RolloutSpec

__all__ = ["RolloutSampler"]


class RolloutSampler:
    """Produces training sequences for a batch of prompts according to a RolloutSpec.

    Args:
        spec: the data source settings. student, teacher: HF causal LMs. eos_ids: EOS token ids
        (first is the one appended to fixed outputs). pad_id: padding id. max_new_tokens: completion cap.
        engine: a served teacher (rollout.engine=vllm: distillspec.rollout.engine) that makes the caches.
        student_engine: the student's vLLM server (distillspec.rollout.student_server.StudentServer) that samples
        the student's rollouts; `before_step` keeps its weights in sync. teacher_scores: Rollout -> SparseRollout,
        the teacher server's top-k scores of on-policy sequences (rollout.teacher_location=server: the teacher
        then never runs in this process). caches: teacher data made before training ({source: TeacherCache};
        distillspec.teacherless), else made by `build_caches`.
    """

    def __init__(self, spec: RolloutSpec, student, teacher, eos_ids: list[int], pad_id: int,
                 max_new_tokens: int, *, engine=None, student_engine=None, teacher_scores=None,
                 caches: dict | None = None) -> None:
        self.spec, self.student, self.teacher = spec, student, teacher
        self.eos_ids, self.pad_id, self.max_new_tokens = eos_ids, pad_id, max_new_tokens
        self.caches: dict = dict(caches or {})  # source -> TeacherCache (made before training, or build_caches)
        self.engine, self.student_engine, self.teacher_scores = engine, student_engine, teacher_scores

    def cached_sources(self) -> list[str]:
        """Sources whose teacher work can be done once per prompt (teacher samples, dataset outputs)."""
        if self.spec.cache_top_k == 0:
            return []
        used = [k for k, v in self.spec.mix.items() if v > 0] if self.spec.source == "mixed" else [self.spec.source]
        return [s for s in used if s in ("teacher", "fixed")]

    def build_caches(self, items, device: torch.device, seed: int, temperature: float, progress: bool = True,
                     load_teacher=None) -> None:
        """Precompute the teacher's completions and top-k log-probs (at loss `temperature`) for `items`; with a
        served teacher (`self.engine`), from it; `load_teacher`: see TeacherCache.build."""
        from distillspec.rollout.cache_store import default_store_dir
        from distillspec.rollout.teacher_cache import TeacherCache

        if self.engine is not None:
            from distillspec.rollout.served_teacher import check_loss_temperature

            check_loss_temperature(temperature)

        for k, source in enumerate(self.cached_sources()):
            if source == "fixed" and any(it.target_ids is None for it in items):
                raise ConfigError("rollout.source=fixed needs dataset outputs, but this task's examples have "
                                  "no target_text; use rollout=student or rollout=teacher")
            cache = TeacherCache(items, source, top_k=self.spec.cache_top_k, temperature=temperature,
                                 sample_temperature=self.spec.temperature, top_p=self.spec.top_p,
                                 max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id)
            store = default_store_dir() if self.spec.cache_store else None
            cache.build(self.teacher, device, seed * 1_000_003 + 17 + k, self.spec.cache_batch_size, progress,
                        store=store, engine=self.engine, engine_args=self.spec.vllm_args, load_teacher=load_teacher)
            self.caches[source] = cache
        if self.engine is not None and self.teacher_scores is None:  # the teacher data is all it serves: a server
            self.engine.close()                                         # this run started is stopped

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step`'s rollouts: a served student gets the current weights when
        rollout.vllm_sync_every steps have passed since its last sync (and at the first step it serves)."""
        if self.student_engine is not None:
            self.student_engine.maybe_sync(step, self.student)

    def choose_source(self, generator: torch.Generator) -> str:
        """The source for this batch: the spec's, or a draw from the mixture fractions (lambda)."""
        if self.spec.source != "mixed":
            return self.spec.source
        u = float(torch.rand((), generator=generator, device=generator.device))
        cum = 0.0
        for name, frac in self.spec.mix.items():
            cum += frac
            if u < cum:
                return name
        return name  # u within rounding of 1.0

    @torch.no_grad()
    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               targets: Sequence[Sequence[int] | None], generator: torch.Generator,
               indices: Sequence[int] | None = None) -> Rollout:
        """input_ids, attention_mask: (B, L) left-padded prompts on the models' device; indices: the
        prompts' item indices (needed to serve cached sources, see build_caches)."""
        from distillspec.sd.baseline import autoregressive_generate

        source = self.choose_source(generator)
        if source in self.caches and indices is not None:
            return self.caches[source].rollout(indices, input_ids.device)
        if source == "fixed":
            comp, lengths = fixed_completions(targets, self.max_new_tokens, self.eos_ids[0], input_ids.device)
        elif source == "student" and self.student_engine is not None:
            comp, lengths = self.student_engine.generate(input_ids, attention_mask, self.max_new_tokens,
                                                         temperature=self.spec.temperature, top_p=self.spec.top_p,
                                                         eos_ids=self.eos_ids, pad_id=self.pad_id)
        elif source in ("student", "teacher"):
            model = self.student if source == "student" else self.teacher
            was_training = model.training
            model.eval()
            res = autoregressive_generate(model, input_ids, attention_mask, self.max_new_tokens,
                                          temperature=self.spec.temperature, top_p=self.spec.top_p,
                                          generator=generator, eos_token_id=self.eos_ids,
                                          pad_token_id=self.pad_id)
            model.train(was_training)
            comp, lengths = res.tokens, res.lengths
        else:  # skd: student proposes gamma-token blocks, teacher replaces the first token outside its top-K
            from distillspec.sd.engine import SpeculativeDecoder

            was_training = self.student.training
            self.student.eval()
            dec = SpeculativeDecoder(self.student, self.teacher, gamma=self.spec.skd_gamma,
                                     temperature=self.spec.temperature, top_p=self.spec.top_p,
                                     acceptance="topk", top_k=self.spec.skd_top_k,
                                     eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
            res = dec.generate(input_ids, attention_mask, self.max_new_tokens, generator=generator)
            self.student.train(was_training)
            comp, lengths = res.tokens, res.lengths
        rollout = assemble(input_ids, attention_mask, comp.to(input_ids.device), lengths.to(input_ids.device),
                           self.pad_id, source)
        return rollout if self.teacher_scores is None else self.teacher_scores(rollout)
