"""On-policy distillation as a Lightning module: rollouts, frozen teacher, divergence, AdamW + cosine.

One optimizer step = one accumulation window of `accumulate` micro-batches. Rollouts for the whole
window are drawn first, so the loss is normalised by the completion-token count of the window (summed
over DDP ranks), not by the number of micro-batches. Prompts and RNG for a step are a pure function
of (seed, step, rank): a resumed run continues with exactly the data and randomness it would have had.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from distillspec import constants as C
from distillspec.lit.guards import (assert_finite_weights, check_finite_step, check_finite_update, check_weight_growth,
                                    weight_norm)
from distillspec.losses.adaptive import entropy_bin_metrics, entropy_bin_sums
from distillspec.losses.divergences import divergence_loss, entropy, overlap
from distillspec.losses.sparse import bucket_stats, sparse_divergence_loss, teacher_buckets
from distillspec.memory import trim_heap
from distillspec.models.forward import completion_logits, completion_outputs
from distillspec.rollout.sources import RolloutSampler
from distillspec.rollout.teacher_cache import SparseRollout
from distillspec.specs import ObjectiveSpec, RolloutSpec, TrainSpec

log = logging.getLogger(__name__)

EVAL_HISTORY_KEY = "distillspec_eval_history"  # checkpoint entry holding DistillModule.eval_history
START_NORM_KEY = "distillspec_start_norm"  # checkpoint entry: the trained weights' norm before the first step
# Per-step sums over completion tokens (summed over ranks, then divided by the window's token count)
SUMS = ("loss", "divergence", "teacher_entropy", "overlap", "gate_accepted", "block_weight")


@torch.no_grad()
def token_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over masked positions of teacher entropy and 1 - TV(p, q), and the count. Inputs (B, T, V)."""
    s, t = student_logits[mask], teacher_logits[mask]
    ent = torch.zeros((), device=s.device)
    ov = torch.zeros((), device=s.device)
    for i in range(0, s.shape[0], chunk):
        ent += entropy(t[i:i + chunk]).sum()
        ov += overlap(t[i:i + chunk], s[i:i + chunk]).sum()
    return ent, ov, torch.tensor(float(s.shape[0]), device=s.device)


class DistillModule(L.LightningModule):
    """Trainable student (draft), frozen teacher (target); manual optimisation for token-normalised accumulation.

    Args:
        student, teacher: HF causal LMs sharing a vocabulary. items: encoded training prompts (`.input_ids`,
        `.target_ids`). objective/rollout/train: specs. eos_ids, pad_id: token ids. max_new_tokens: rollout
        length. seed: base seed. evaluator: optional SDEvaluator (its `.run(device)`) of the periodic acceptance
        curve on its prompts. skip_eval_at: a step whose periodic evaluation is left out (the last step when the
        caller's final evaluation measures the same prompts). sampler: the RolloutSampler to draw rollouts with
        (one built with its engines: vLLM servers); None: built here from `rollout` for this student and teacher.
    """

    def __init__(self, student, teacher, items: Sequence[Any], objective: ObjectiveSpec, rollout: RolloutSpec,
                 train: TrainSpec, eos_ids: list[int], pad_id: int, max_new_tokens: int, seed: int = 0,
                 evaluator=None, skip_eval_at: int | None = None,
                 sampler: RolloutSampler | None = None) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher  # teacher None: every rollout is sparse (teacher_location=server)
        if teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.items, self.objective, self.train_spec = items, objective, train
        self.sampler = sampler if sampler is not None else RolloutSampler(rollout, student, teacher, eos_ids, pad_id,
                                                                          max_new_tokens)
        self.pad_id, self.seed = pad_id, seed
        self.evaluator, self.skip_eval_at = evaluator, skip_eval_at
        self.eval_history: list[dict[str, float]] = []
        self.start_norm: float | None = None  # trained weights' L2 norm before step 0 (check_weight_growth)
        self.growth_warned = False
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the student only

    # ---- optimisation ----
    def configure_optimizers(self):
        from functools import partial

        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.train_spec.lr, weight_decay=self.train_spec.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
            lr_factor, warmup_steps=self.train_spec.warmup_steps, max_steps=self.train_spec.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The acceptance curve so far travels with the checkpoint: a resumed run keeps its earlier points (and
        the weights' starting norm, the reference of the growth check)."""
        checkpoint[EVAL_HISTORY_KEY] = list(self.eval_history)
        checkpoint[START_NORM_KEY] = self.start_norm

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.eval_history = list(checkpoint.get(EVAL_HISTORY_KEY, []))
        self.start_norm = checkpoint.get(START_NORM_KEY)

    def state_dict(self, *args, **kwargs):
        """Only the student is checkpointed (the teacher is frozen and reloaded from its source)."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("teacher.")}

    # ---- data ----
    def step_indices(self, step: int) -> list[int]:
        """Prompt indices for optimizer step `step` on this rank: epochs of seeded permutations."""
        per_rank = self.train_spec.batch_size * self.train_spec.accumulate
        world, rank = self.trainer.world_size, self.trainer.global_rank
        start = step * per_rank * world + rank * per_rank
        n = len(self.items)
        out = []
        for k in range(start, start + per_rank):
            epoch, pos = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            out.append(int(perm[pos]))
        return out

    def step_generator(self, step: int) -> torch.Generator:
        rank = self.trainer.global_rank
        return torch.Generator(device=self.device).manual_seed(
            (self.seed * 1_000_003 + step * 101 + rank) % (2**63 - 1))

    def _micro_batches(self, indices: list[int]):
        from distillspec.lit.data import left_pad

        bs = self.train_spec.batch_size
        for i in range(0, len(indices), bs):
            idx = indices[i:i + bs]
            chunk = [self.items[j] for j in idx]
            ids, mask = left_pad([it.input_ids for it in chunk], self.pad_id)
            yield ids.to(self.device), mask.to(self.device), [it.target_ids for it in chunk], idx

    @property
    def dense_teacher(self) -> bool:
        """Run the teacher on every step's sequences (its full distributions), cached sequences included."""
        return self.objective.needs_dense_teacher or self.sampler.spec.teacher_logits == "dense"

    def on_fit_start(self) -> None:
        """Teacher work that does not change between steps (teacher/fixed data) is done once, here: the
        completions, and the teacher's top-k log-probs the sparse loss trains on. With a dense teacher
        (`dense_teacher`) only the cached completions are used and the teacher scores them every step."""
        if self.sampler.cached_sources() and not self.sampler.caches:
            if self.objective.needs_dense_teacher and self.sampler.spec.teacher_logits == "sparse":
                log.info("this objective needs the teacher's full distributions: the cached teacher data's "
                         "completions are scored by the teacher every step (as rollout.teacher_logits=dense)")
            self.sampler.build_caches(self.items, self.device, self.seed, self.objective.temperature,
                                      progress=self.trainer.global_rank == 0)

    # ---- the step ----
    def training_step(self, batch, batch_idx):
        """One optimizer step: the window's rollouts, the loss of each (by kind), the update, its metrics."""
        step = self.global_step
        if step == 0 and self.evaluator is not None and not self.eval_history:
            self.periodic_eval(step)
        gen = self.step_generator(step)
        t_start = time.perf_counter()
        rollouts, t_synced, t_rolled = self.draw_rollouts(step, gen)
        self.show_phase("loss")
        tokens = torch.tensor(float(sum(r.num_tokens for r in rollouts)), device=self.device)
        total = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        normalizer = max(float(total) / self.trainer.world_size, 1.0)
        self.student.train()
        sums = torch.zeros(len(SUMS), device=self.device)
        bin_sums = 0  # per teacher-entropy bin: counts, divergence sums; beta sum; tokens (entropy_bin_sums)
        for r in rollouts:
            if isinstance(r, SparseRollout) and not self.dense_teacher:  # sparse cached teacher: student only
                bin_sums = bin_sums + self.sparse_loss(r, normalizer, sums)
            else:
                bin_sums = bin_sums + self.dense_loss(r, normalizer, gen, sums)
        lr = self.optimizer_step(sums[SUMS.index("loss")], step)
        self.log_step(sums, bin_sums, total, lr, (t_start, t_synced, t_rolled))
        self.after_step(step, rollouts)
        self.show_phase(None)

    def draw_rollouts(self, step: int, gen: torch.Generator) -> tuple[list, float, float]:
        """The accumulation window's rollouts (one per micro-batch), after the student engine's weight sync;
        also the clock at the end of the sync and of the rollouts."""
        self.show_phase("rollouts")
        self.sampler.before_step(step)
        t_synced = time.perf_counter()
        rollouts = [self.sampler.sample(ids, mask, targets, gen, indices=idx)
                    for ids, mask, targets, idx in self._micro_batches(self.step_indices(step))]
        return rollouts, t_synced, time.perf_counter()

    def sparse_loss(self, r: SparseRollout, normalizer: float, sums: torch.Tensor):
        """Backward of the divergence to a sparse teacher (its top-k log-probs + tail bucket; the student's
        forward only). Adds the rollout's loss, divergence, teacher entropy and overlap to `sums` (len(SUMS),)
        and returns its entropy-bin sums."""
        obj = self.objective
        mask = r.completion_mask()
        # more positions than one chunk: hidden states and the head (the loss maps a chunk at a time)
        s_in, head = completion_outputs(self.student, r, int(mask.sum()), obj.chunk_size)
        aux: dict = {}
        loss, per_tok = sparse_divergence_loss(
            s_in, r.topk_idx, r.topk_logp, mask, obj.divergence, temperature=obj.temperature,
            beta=obj.beta, alpha=obj.alpha, chunk_size=obj.chunk_size, normalizer=normalizer,
            tail_logp=r.tail_logp, to_logits=head, aux=aux)
        self.manual_backward(loss)
        ent, ov = bucket_stats(aux["student_buckets"], aux["teacher_buckets"])
        sums[:4] += torch.stack([loss.detach() * normalizer, per_tok.detach()[mask].sum(), ent, ov])
        tb = teacher_buckets(r.topk_logp, r.tail_logp)  # (B, T, k + 1): the sparse teacher's entropy
        return entropy_bin_sums(per_tok, -(tb.exp() * tb).sum(-1), mask)

    def dense_loss(self, r, normalizer: float, gen: torch.Generator, sums: torch.Tensor):
        """Backward of the divergence to the teacher's full distributions (the teacher runs on the rollout),
        gated (div.gate) and weighted (div.block_weighting, adaptive schedules) as the objective says. Adds to
        `sums` (len(SUMS),) and returns the rollout's entropy-bin sums."""
        if self.teacher is None:
            raise RuntimeError(f"a {r.source!r} rollout needs the teacher's full distributions, and none is loaded")
        obj = self.objective
        mask = r.completion_mask()
        with torch.no_grad():
            t_logits = completion_logits(self.teacher, r)
        s_logits = completion_logits(self.student, r)
        weights = None
        if obj.gate is not None:
            from distillspec.losses.gating import speckd_gate

            g = obj.gate
            gate = speckd_gate(s_logits.detach(), t_logits, top_k=g.top_k, mode=g.mode,
                               num_candidates=g.num_candidates, beta=g.beta, generator=gen)
            weights = gate.weights
            sums[SUMS.index("gate_accepted")] += (gate.accepted & mask).sum()
        aux: dict = {}
        loss, per_tok = divergence_loss(s_logits, t_logits, mask, obj.divergence, weights=weights,
                                        temperature=obj.temperature, beta=obj.beta, alpha=obj.alpha,
                                        chunk_size=obj.chunk_size, normalizer=normalizer,
                                        schedule=obj.adaptive, block_weighting=obj.block_weighting,
                                        block_gamma=obj.block_gamma, aux=aux)
        self.manual_backward(loss)
        bins = entropy_bin_sums(per_tok, aux["entropy"], mask, aux.get("beta"))
        if "block_weight" in aux:
            sums[SUMS.index("block_weight")] += aux["block_weight"][mask].sum()
        ent, ov, _ = token_stats(s_logits.detach(), t_logits, mask)
        sums[:4] += torch.stack([loss.detach() * normalizer, per_tok.detach()[mask].sum(), ent, ov])
        return bins

    def optimizer_step(self, loss_sum: torch.Tensor, step: int) -> float:
        """Check the step is finite, clip, step the optimizer and the schedule, check the weights' growth;
        returns the step's learning rate."""
        check_finite_step(loss_sum, self.student.parameters(), step, self.trainer.strategy)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        if self.train_spec.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.train_spec.grad_clip, gradient_clip_algorithm="norm")
        trained = [p for p in self.student.parameters() if p.requires_grad]
        if self.start_norm is None:
            self.start_norm = weight_norm(trained, self.trainer.strategy)
        lr = float(opt.param_groups[0]["lr"])  # the lr of this step (sched.step() below sets the next one's)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trim_heap()  # the step's freed activations and gradients go back to the OS (distillspec.memory)
        sched.step()
        self.growth_warned = check_weight_growth(trained, self.start_norm, step, lr, self.trainer.strategy,
                                                 warned=self.growth_warned)
        return lr

    def log_step(self, sums: torch.Tensor, bin_sums, total: torch.Tensor, lr: float,
                 clock: tuple[float, float, float]) -> None:
        """The step's train/ metrics (sums over ranks, per completion token) to the loggers, the loss to the bar.
        clock: perf_counter at the step's start, after the student's sync, after the rollouts."""
        obj = self.objective
        t_start, t_synced, t_rolled = clock
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n = max(float(total), 1.0)
        stats = {C.TRAIN_LOSS: sums[0] / n, C.TRAIN_DIVERGENCE: sums[1] / n, C.TRAIN_TEACHER_ENTROPY: sums[2] / n,
                 C.TRAIN_ALIGNMENT: sums[3] / n, C.TRAIN_COMPLETION_TOKENS: total, C.TRAIN_LR: torch.tensor(lr),
                 C.TRAIN_STEP_SECONDS: time.perf_counter() - t_start, C.TRAIN_ROLLOUT_SECONDS: t_rolled - t_start,
                 C.TRAIN_SYNC_SECONDS: t_synced - t_start}
        if obj.gate is not None:
            stats[C.TRAIN_TAR] = sums[SUMS.index("gate_accepted")] / n
        if obj.block_weighting != "none":
            stats[C.TRAIN_BLOCK_WEIGHT_MEAN] = sums[SUMS.index("block_weight")] / n
        stats.update(entropy_bin_metrics(self.trainer.strategy.reduce(bin_sums, reduce_op="sum"),
                                         with_beta=obj.divergence == "adaptive"))
        self.log_dict({k: float(v) for k, v in stats.items()}, prog_bar=False, on_step=True, batch_size=1)
        self.log("loss", float(stats[C.TRAIN_LOSS]), prog_bar=True, on_step=True, batch_size=1, logger=False)

    def after_step(self, step: int, rollouts: list) -> None:
        """After the update of step `step`: the finiteness check before a checkpoint or the draft's save, and
        the periodic evaluation when one is due."""
        done = self.global_step  # incremented by opt.step()
        if done == self.train_spec.max_steps or done % self.train_spec.checkpoint_every == 0:
            # before the checkpoint / draft save that follows: a diverging last update has no next loss to catch it
            check_finite_update(self.student, lambda: completion_logits(self.student, rollouts[0]), step,
                                self.trainer.strategy)
        if (self.evaluator is not None and self.train_spec.eval_every and done % self.train_spec.eval_every == 0
                and done != self.skip_eval_at):
            self.periodic_eval(done)

    def show_phase(self, phase: str | None) -> None:
        """Name what the step is doing in the training bar (distillspec.lit.progress.StepProgressBar)."""
        bar = getattr(self._trainer, "progress_bar_callback", None) if self._trainer is not None else None
        if hasattr(bar, "set_phase"):
            bar.set_phase(phase)

    def periodic_eval(self, step: int) -> None:
        """Small SD evaluation of the current student (rank 0), logged as val/ + sd names at `step`."""
        if self.trainer.global_rank != 0:
            return
        what = getattr(self.evaluator, "label", "SD eval")  # the evaluation's name in the bar and the log
        self.show_phase(f"{what} @ step {step}")
        report = self.evaluator.run(self.device, desc=f"{what} @ step {step}")
        metrics = {C.VAL_PREFIX + k: float(v) for k, v in report.metrics.items()}
        self.eval_history.append({"step": step, **metrics})
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)
        headline = C.ALPHA_HELDOUT if C.ALPHA_HELDOUT in report.metrics else C.ALPHA_TOK
        log.info("step %d: %s=%.4f", step, headline, report.metrics.get(headline, math.nan))


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warm-up (step + 1) / warmup_steps over the
    first warmup_steps steps (step 0 trains at lr / warmup_steps, never at 0), reaching 1 at step
    peak = max(warmup_steps - 1, 0); then cosine decay 0.5 (1 + cos(pi (step - peak) / (max_steps - peak))), which
    stays > 0 for every step taken. warmup_steps 0 and 1 both mean no warm-up (transformers' cosine schedule)."""
    peak = max(warmup_steps - 1, 0)
    if step < peak:
        return (step + 1) / warmup_steps
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - peak) / max(1, max_steps - peak))))


def save_hf_atomic(model, tokenizer, out_dir: Path) -> None:
    """save_pretrained into a temp dir, then rename over `out_dir` (never a half-written draft dir)."""
    import shutil

    assert_finite_weights(model)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        out_dir.replace(old)
    tmp.replace(out_dir)
    shutil.rmtree(old, ignore_errors=True)
