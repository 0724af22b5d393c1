"""Section 2: on-policy distillation steps at full size: throughput and peak GPU memory.

Student = the small shape (Qwen3-0.6B), teacher = the big one (Qwen3-4B), random weights, both in bf16 on the
device (`--train-dtype`). One optimizer step of distillspec's `DistillModule` (the class `python run.py`
trains with) run by a Lightning Trainer: student rollouts sampled at T = 1 (random weights: no EOS, every
row is new_tokens long), teacher forward, student forward + backward through the chunked forward-KL loss,
AdamW. One warm-up step, then `steps` timed steps: completion tokens / second and peak allocated GPU
memory over the timed steps (weights included).
Variants: the teacher in 8-bit (when `bitsandbytes` imports: saved once to a temp dir and loaded through
distillspec.models.loading.load_model(quantization="8bit")), and TRL's GKDTrainer on the same models
and prompts (when `trl` and `datasets` import; see gpucheck/trl_gkd.py).
"""

from __future__ import annotations

import importlib.util
import time
from types import SimpleNamespace

import torch

from gpucheck.common import Ctx, TimeGuard, build, ragged_prompts, release


def distill_steps(ctx: Ctx, student, teacher, prompts, *, batch: int, new_tokens: int, steps: int) -> dict:
    """Run 1 + steps optimizer steps of DistillModule; tokens/s and peak memory of the timed steps."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from distillspec.lit.data import IndexDataset
    from distillspec.lit.train_module import DistillModule
    from distillspec.specs import ObjectiveSpec, RolloutSpec, TrainSpec

    items = [SimpleNamespace(input_ids=p, target_ids=None) for p in prompts]
    # Every setting explicit: the check runs where Hydra and OmegaConf (which read conf/'s defaults) are absent.
    spec = TrainSpec(max_steps=steps + 1, batch_size=batch, accumulate=1, lr=1e-5, weight_decay=0.0, warmup_steps=0,
                     grad_clip=1.0, num_train=len(items), max_new_tokens=new_tokens, log_every=1,
                     checkpoint_every=steps + 1, keep_checkpoints=True, eval_every=0, eval_num=0, lora_rank=0,
                     freeze_embeddings=False, release_target=False, curve="sd")
    objective = ObjectiveSpec(divergence="fkl", temperature=1.0, beta=0.5, alpha=0.1, chunk_size=1024, gate=None,
                              adaptive=None, block_weighting="none", block_gamma=5)
    rollout = RolloutSpec(source="student", mix=None, temperature=1.0, top_p=1.0, skd_top_k=25, skd_gamma=5,
                          cache_top_k=0, cache_batch_size=batch, cache_store=False, teacher_logits="sparse",
                          engine="hf", vllm_url=None, vllm_port=None, vllm_python=None, vllm_args=[],
                          vllm_sync_every=1, teacher_location="process")
    student.requires_grad_(True)
    module = DistillModule(student, teacher, items, objective, rollout, spec, eos_ids=[-1], pad_id=0,
                           max_new_tokens=new_tokens, seed=ctx.seed)
    stats = {"tokens": 0, "t0": None, "t1": None, "peak": None}

    class Meter(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:  # after the warm-up step
                ctx.reset_peak()
                stats["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ctx.sync()
            if stats["t0"] is not None:
                stats["t1"] = time.perf_counter()
                stats["tokens"] += int(trainer.callback_metrics["train/completion_tokens"])
                stats["peak"] = ctx.peak_gib()

    trainer = L.Trainer(accelerator="gpu" if ctx.device.type == "cuda" else "cpu", devices=1, max_steps=steps + 1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Meter()], use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(IndexDataset(steps + 1), batch_size=None))
    secs = stats["t1"] - stats["t0"]
    student.requires_grad_(False)
    return {"steps": steps, "batch": batch, "new_tokens": new_tokens, "completion_tokens": stats["tokens"],
            "seconds": secs, "tokens_per_s": stats["tokens"] / secs, "peak_gib": stats["peak"]}


def quantized_teacher(ctx: Ctx, teacher, tmpdir: str):
    """The teacher saved once and reloaded in 8-bit through distillspec's own loader."""
    from distillspec.models.loading import load_model

    teacher.save_pretrained(tmpdir)
    return load_model(tmpdir, dtype="bfloat16", quantization="8bit", device=ctx.device)


def run(ctx: Ctx, guard: TimeGuard, *, batch: int = 8, prompt_len: int = 64, new_tokens: int = 128,
        steps: int = 2, dtype: torch.dtype | None = None, student_shape: str = "qwen3-0.6b",
        teacher_shape: str = "qwen3-4b", trl: bool = True) -> dict:
    import tempfile

    dtype = dtype or ctx.dtype
    student = build(ctx, student_shape, dtype=dtype, seed=4)
    teacher = build(ctx, teacher_shape, dtype=dtype, seed=5)
    prompts = ragged_prompts(batch * (steps + 1), prompt_len, teacher.config.vocab_size, ctx.seed + 2)
    rows, skipped = [], []
    row = distill_steps(ctx, student, teacher, prompts, batch=batch, new_tokens=new_tokens, steps=steps)
    rows.append({"implementation": f"distillspec DistillModule, teacher {str(dtype).split('.')[-1]}", **row})
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not has_bnb or ctx.device.type != "cuda":
        skipped.append("8-bit teacher: " + ("bitsandbytes not installed" if not has_bnb else "needs CUDA"))
    elif guard.left() <= 0:
        skipped.append("8-bit teacher: time guard")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            q8 = quantized_teacher(ctx, teacher, tmp)
            del teacher
            release()
            row = distill_steps(ctx, student, q8, prompts, batch=batch, new_tokens=new_tokens, steps=steps)
            rows.append({"implementation": "distillspec DistillModule, teacher 8-bit", **row})
            teacher = q8
    have_trl = all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))
    if not trl or not have_trl:
        skipped.append("TRL GKDTrainer: " + ("disabled" if not trl else "trl/datasets not installed"))
    elif guard.left() <= 0:
        skipped.append("TRL GKDTrainer: time guard")
    else:
        from gpucheck.trl_gkd import gkd_steps

        try:
            row = gkd_steps(ctx, student, teacher, prompts, batch=batch, new_tokens=new_tokens, steps=steps)
            rows.append({"implementation": "TRL GKDTrainer (lmbda=1, beta=0)", **row})
        except Exception as exc:  # an API drift in an optional comparison must not lose the other numbers
            skipped.append(f"TRL GKDTrainer: failed: {type(exc).__name__}: {exc}"[:300])
    del student, teacher
    release()
    return {"rows": rows, "skipped": skipped, "shapes": [student_shape, teacher_shape]}
