"""TRL's GKDTrainer on the GPU check's models and prompts (optional: needs `trl` and `datasets`).

lmbda = 1 (every batch generated on-policy by the student at T = 1), beta = 0 (forward KL), AdamW lr 1e-5,
the same prompt token ids in the same order as distillspec's run (sequential sampler), same batch and
max_new_tokens. Random models have no tokenizer, so the character tokenizer of the tiny test pair stands in
for padding (pad id 0, as in distillspec's run); prompts are given pre-tokenised. Completion tokens are
counted from TRL's own on-policy generations (labels != -100) over the steps after the first.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def gkd_steps(ctx, student, teacher, prompts, *, batch: int, new_tokens: int, steps: int) -> dict:
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillspec.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    rows = [{"prompt": "p", "input_ids": list(p) + [tok.eos_token_id],
             "completion_mask": [0] * len(p) + [1]} for p in prompts[: batch * (steps + 1)]]
    meter = {"tokens": 0, "t0": None, "t1": None, "peak": None}
    generate = GKDTrainer.generate_on_policy_outputs

    def counting(model, inputs, generation_config, *args, **kwargs):
        out = generate(model, inputs, generation_config, *args, **kwargs)
        if meter["t0"] is not None:
            meter["tokens"] += int((out[2] != -100).sum())
        return out

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                ctx.reset_peak()
                meter["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            ctx.sync()
            if meter["t0"] is not None:
                meter["t1"], meter["peak"] = time.perf_counter(), ctx.peak_gib()

    GKDTrainer.generate_on_policy_outputs = staticmethod(counting)
    student.requires_grad_(True)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            cfg = GKDConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps + 1,
                            learning_rate=1e-5, warmup_steps=0, lmbda=1.0, beta=0.0, temperature=1.0,
                            max_new_tokens=new_tokens, save_strategy="no", report_to="none", logging_steps=1000,
                            use_cpu=ctx.device.type != "cuda", bf16=False, fp16=False, seed=ctx.seed,
                            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True)
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok, callbacks=[Meter()])
            trainer.train()
    finally:
        GKDTrainer.generate_on_policy_outputs = staticmethod(generate)
        student.requires_grad_(False)
    secs = meter["t1"] - meter["t0"]
    return {"steps": steps, "batch": batch, "new_tokens": new_tokens, "completion_tokens": meter["tokens"],
            "seconds": secs, "tokens_per_s": meter["tokens"] / secs, "peak_gib": meter["peak"]}
