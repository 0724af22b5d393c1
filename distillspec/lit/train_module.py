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
from distillspec.losses.adaptive import entropy_bin_metrics, entropy_bin_sums
from distillspec.losses.divergences import divergence_loss, entropy, overlap
from distillspec.losses.sparse import bucket_stats, sparse_divergence_loss, teacher_buckets
from distillspec.models.forward import completion_logits, completion_outputs
from distillspec.rollout.sources import RolloutSampler
from distillspec.rollout.teacher_cache import SparseRollout
from distillspec.specs import ObjectiveSpec, RolloutSpec, TrainSpec

log = logging.getLogger(__name__)

EVAL_HISTORY_KEY = "distillspec_eval_history"  # checkpoint entry holding DistillModule.eval_history
START_NORM_KEY = "distillspec_start_norm"  # checkpoint entry: the trained weights' norm before the first step
# The trained weights' L2 norm, as a multiple of its value before the first step: above WARN a warning (once),
# above LIMIT the run stops. AdamW moves each weight by about lr per step whatever the gradient's scale (clipping
# does not bound it), so weights of rms ~0.02 at lr 1e-3 move a few % per step; lr=1e30 multiplies the norm ~1e31.
WEIGHT_GROWTH_WARN = 10.0
WEIGHT_GROWTH_LIMIT = 1e3


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
        length. seed: base seed. evaluator: optional SDEvaluator-like object with `.run(loader, device)` for the
        periodic acceptance curve, and eval_loader its prompts. skip_eval_at: a step whose periodic evaluation
        is left out (the last step when the caller's final evaluation measures the same prompts).
    """

    def __init__(self, student, teacher, items: Sequence[Any], objective: ObjectiveSpec, rollout: RolloutSpec,
                 train: TrainSpec, eos_ids: list[int], pad_id: int, max_new_tokens: int, seed: int = 0,
                 evaluator=None, eval_loader=None, skip_eval_at: int | None = None) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher  # teacher None: every rollout is sparse (teacher_location=server)
        if teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.items, self.objective, self.train_spec = items, objective, train
        self.sampler = RolloutSampler(rollout, student, teacher, eos_ids, pad_id, max_new_tokens)
        self.pad_id, self.seed = pad_id, seed
        self.evaluator, self.eval_loader, self.skip_eval_at = evaluator, eval_loader, skip_eval_at
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
        step = self.global_step
        if step == 0 and self.evaluator is not None and not self.eval_history:
            self.periodic_eval(step)
        gen = self.step_generator(step)
        self.show_phase("rollouts")
        t_start = time.perf_counter()
        self.sampler.before_step(step)
        t_synced = time.perf_counter()
        rollouts = [self.sampler.sample(ids, mask, targets, gen, indices=idx)
                    for ids, mask, targets, idx in self._micro_batches(self.step_indices(step))]
        t_rolled = time.perf_counter()
        self.show_phase("loss")
        tokens = torch.tensor(float(sum(r.num_tokens for r in rollouts)), device=self.device)
        total = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        normalizer = max(float(total) / self.trainer.world_size, 1.0)
        self.student.train()
        obj = self.objective
        sums = torch.zeros(6, device=self.device)  # loss, divergence, entropy, overlap, gate accepted, block weight
        bin_sums = 0  # per teacher-entropy bin: counts, divergence sums; beta sum; tokens (entropy_bin_sums)
        for r in rollouts:
            mask = r.completion_mask()
            if isinstance(r, SparseRollout) and not self.dense_teacher:  # sparse cached teacher: student only
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
                bin_sums = bin_sums + entropy_bin_sums(per_tok, -(tb.exp() * tb).sum(-1), mask)
                continue
            if self.teacher is None:
                raise RuntimeError(f"a {r.source!r} rollout needs the teacher's full distributions, and none is loaded")
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
                sums[4] += (gate.accepted & mask).sum()
            aux: dict = {}
            loss, per_tok = divergence_loss(s_logits, t_logits, mask, obj.divergence, weights=weights,
                                            temperature=obj.temperature, beta=obj.beta, alpha=obj.alpha,
                                            chunk_size=obj.chunk_size, normalizer=normalizer,
                                            schedule=obj.adaptive, block_weighting=obj.block_weighting,
                                            block_gamma=obj.block_gamma, aux=aux)
            self.manual_backward(loss)
            bin_sums = bin_sums + entropy_bin_sums(per_tok, aux["entropy"], mask, aux.get("beta"))
            if "block_weight" in aux:
                sums[5] += aux["block_weight"][mask].sum()
            ent, ov, _ = token_stats(s_logits.detach(), t_logits, mask)
            sums[:4] += torch.stack([loss.detach() * normalizer, per_tok.detach()[mask].sum(), ent, ov])
        check_finite_step(sums[0], self.student.parameters(), step, self.trainer.strategy)
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
        sched.step()
        self.growth_warned = check_weight_growth(trained, self.start_norm, step, lr, self.trainer.strategy,
                                                 warned=self.growth_warned)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n = max(float(total), 1.0)
        stats = {C.TRAIN_LOSS: sums[0] / n, C.TRAIN_DIVERGENCE: sums[1] / n, C.TRAIN_TEACHER_ENTROPY: sums[2] / n,
                 C.TRAIN_ALIGNMENT: sums[3] / n, C.TRAIN_COMPLETION_TOKENS: total,
                 C.TRAIN_LR: torch.tensor(lr), C.TRAIN_STEP_SECONDS: time.perf_counter() - t_start,
                 C.TRAIN_ROLLOUT_SECONDS: t_rolled - t_start, C.TRAIN_SYNC_SECONDS: t_synced - t_start}
        if obj.gate is not None:
            stats[C.TRAIN_TAR] = sums[4] / n
        if obj.block_weighting != "none":
            stats[C.TRAIN_BLOCK_WEIGHT_MEAN] = sums[5] / n
        stats.update(entropy_bin_metrics(self.trainer.strategy.reduce(bin_sums, reduce_op="sum"),
                                         with_beta=obj.divergence == "adaptive"))
        self.log_dict({k: float(v) for k, v in stats.items()}, prog_bar=False, on_step=True, batch_size=1)
        self.log("loss", float(stats[C.TRAIN_LOSS]), prog_bar=True, on_step=True, batch_size=1, logger=False)
        done = self.global_step  # incremented by opt.step()
        if done == self.train_spec.max_steps or done % self.train_spec.checkpoint_every == 0:
            # before the checkpoint / draft save that follows: a diverging last update has no next loss to catch it
            check_finite_update(self.student, lambda: completion_logits(self.student, rollouts[0]), step,
                                self.trainer.strategy)
        if (self.evaluator is not None and self.train_spec.eval_every and done % self.train_spec.eval_every == 0
                and done != self.skip_eval_at):
            self.periodic_eval(done)
        self.show_phase(None)

    def show_phase(self, phase: str | None) -> None:
        """Name what the step is doing in the training bar (distillspec.lit.progress.StepProgressBar)."""
        bar = getattr(self._trainer, "progress_bar_callback", None) if self._trainer is not None else None
        if hasattr(bar, "set_phase"):
            bar.set_phase(phase)

    def periodic_eval(self, step: int) -> None:
        """Small SD evaluation of the current student (rank 0), logged as val/ + sd names at `step`."""
        if self.trainer.global_rank != 0:
            return
        self.show_phase(f"SD eval @ step {step}")
        self.student.eval()
        report = self.evaluator.run(self.eval_loader, self.device, progress=True, desc=f"SD eval @ step {step}")
        self.student.train()
        metrics = {C.VAL_PREFIX + k: float(v) for k, v in report.metrics.items()}
        self.eval_history.append({"step": step, **metrics})
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)
        log.info("step %d: %s=%.4f", step, C.ALPHA_TOK, report.metrics.get(C.ALPHA_TOK, math.nan))


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warm-up (step + 1) / warmup_steps over the
    first warmup_steps steps (step 0 trains at lr / warmup_steps, never at 0), reaching 1 at step
    peak = max(warmup_steps - 1, 0); then cosine decay 0.5 (1 + cos(pi (step - peak) / (max_steps - peak))), which
    stays > 0 for every step taken. warmup_steps 0 and 1 both mean no warm-up (transformers' cosine schedule)."""
    peak = max(warmup_steps - 1, 0)
    if step < peak:
        return (step + 1) / warmup_steps
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - peak) / max(1, max_steps - peak))))


def weight_norm(params, strategy=None) -> float:
    """L2 norm of `params`, squares summed over ranks (sharded weights count once; DDP replicas give sqrt(world)
    x the norm at every check alike, so ratios of two norms are unaffected). inf when float32 overflows."""
    params = [p.detach() for p in params]
    if not params:
        return 0.0
    sq = torch.nn.utils.get_total_norm(params).float() ** 2
    if strategy is not None:
        sq = strategy.reduce(sq, reduce_op="sum")
    return float(sq.sqrt())


def check_weight_growth(params, start_norm: float, step: int, lr: float, strategy=None, warned: bool = False) -> bool:
    """After the optimizer step of training step `step` (lr: its learning rate): raise NonFiniteError when the
    trained weights' norm exceeds WEIGHT_GROWTH_LIMIT x `start_norm` (finite but blown up, e.g. lr=1e30: every
    weight moved by ~lr), and warn once above WEIGHT_GROWTH_WARN x. Returns whether it has warned.
    params: the trained parameters; start_norm: their weight_norm before step 0 (0: no check)."""
    from distillspec.errors import NonFiniteError

    norm = weight_norm(params, strategy)
    if math.isnan(norm) or not start_norm > 0:  # NaN weights: check_finite_update / check_finite_step name them
        return warned
    growth = norm / start_norm
    if growth > WEIGHT_GROWTH_LIMIT:  # inf too: finite weights above ~1e19 overflow a float32 norm
        largest = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
        size = f"{norm:.3g}, {growth:.3g} x" if math.isfinite(norm) else "beyond float32's range, vs"
        raise NonFiniteError(f"the update of training step {step} blew up the draft's weights: their norm is "
                             f"{size} its {start_norm:.3g} before training (limit {WEIGHT_GROWTH_LIMIT:g} x; largest "
                             f"|weight| {largest:.3g}; lr of the step {lr:.3g}); "
                             "stopped before this step is checkpointed, so no checkpoint or draft holds these "
                             "weights. Lower train.lr")
    if growth > WEIGHT_GROWTH_WARN and not warned:
        log.warning("training step %d: the draft's trained weights' norm has grown %.3g x since before training "
                    "(%.3g -> %.3g; lr of the step %.3g); at %g x the run stops. Is train.lr too high?", step, growth,
                    start_norm, norm, lr, WEIGHT_GROWTH_LIMIT)
        return True
    return warned


def check_finite_step(loss_sum: torch.Tensor, params, step: int, strategy=None) -> None:
    """Raise NonFiniteError (on every rank) if the step's loss or any gradient is NaN/inf.

    Called after backward and before the optimizer step, so the weights (and every checkpoint and saved
    draft) stay those of the last finite step. loss_sum: () tensor; params: the trained parameters.
    """
    from distillspec.errors import NonFiniteError

    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss_sum.device)
    bad = torch.stack([(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float().to(loss_sum.device)])
    if strategy is not None:
        bad = strategy.reduce(bad, reduce_op="sum")  # every rank stops together
    if bool(bad.any()):
        what = " and ".join(n for n, b in zip(("loss", "gradient"), bad.tolist()) if b)
        raise NonFiniteError(f"non-finite {what} at training step {step} (loss sum {float(loss_sum):.4g}, "
                             f"gradient norm {float(grad_norm):.4g}); stopped before the optimizer step, so "
                             "checkpoints keep the last finite weights and no draft was saved. Lower train.lr, "
                             "set train.grad_clip, or check the models' dtype (pair.dtype=float32)")


def check_finite_update(model, outputs, step: int, strategy=None) -> None:
    """Raise NonFiniteError (on every rank) if the update of training step `step` left a NaN/inf parameter or
    non-finite outputs (huge finite weights, e.g. from lr=1e10, overflow in the forward pass).

    Called after the optimizer step and before that step is checkpointed: the next step's loss check would catch
    this, but the last step has no next one. outputs: a callable running `model` (in eval mode, no grad) on
    some of this step's sequences.
    """
    from distillspec.errors import NonFiniteError

    bad_param = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    bad_out = False
    if bad_param is None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = outputs()
        model.train(was_training)
        bad_out = not bool(torch.isfinite(out).all())
    bad = torch.tensor([float(bad_param is not None or bad_out)], device=next(model.parameters()).device)
    if strategy is not None:
        bad = strategy.reduce(bad, reduce_op="sum")  # every rank stops together
    if bool(bad.any()):
        what = (f"parameter {bad_param} holds NaN/inf" if bad_param else "its outputs on this step's sequences are "
                "NaN/inf" if bad_out else "on another rank")
        largest = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
        raise NonFiniteError(f"the update of training step {step} made the draft non-finite ({what}; largest "
                             f"|weight| {largest:.3g}); stopped before it is checkpointed, so checkpoints keep the "
                             "last finite weights and no draft was saved. Lower train.lr, set train.grad_clip, or "
                             "check the models' dtype (pair.dtype=float32)")


def assert_finite_weights(model) -> None:
    """Raise NonFiniteError naming the first parameter holding NaN/inf (never save such a draft)."""
    from distillspec.errors import NonFiniteError

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"draft parameter {name} has non-finite values; the draft is not saved")


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
