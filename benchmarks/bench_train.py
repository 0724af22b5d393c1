"""Training throughput: distillspec's distillation step vs TRL's GKDTrainer, same everything.

    python benchmarks/bench_train.py [--steps 8] [--batch 4] [--max-new-tokens 64] [--draft-layers 4] [--threads 2]
                                     [--chunk-size 1024|none] [--source student|fixed] [--epochs 1]

--source student (default): on-policy student samples (TRL lambda = 1). --source fixed: the dataset's solutions
(TRL lambda = 0), the prompts reused for --epochs epochs; distillspec computes the teacher's top-k distributions
once per prompt (rollout.cache_top_k, the default 64) while TRL runs the teacher every step. In fixed mode the
clock covers the whole fit (cache building and the first step included) for both; the on-disk teacher-data
store is off (rollout.cache_store=false), so the run builds its cache.

Same pair (offline SmolLM2-135M target, its first N layers as the student), same prompts (the built-in
arithmetic task, chat-formatted, the identical token ids in the identical per-step order), batch, max new
tokens, pure sampling at temperature 1 from the student, divergence forward KL (TRL beta = 0), AdamW
lr 1e-5 + cosine, grad clip 1.0, CPU fp32, same torch thread count. Each implementation runs in its own
subprocess so peak RSS (ru_maxrss) is its own. Throughput = student completion tokens (up to and
including the first EOS) per second over whole steps (rollout + teacher forward + student
forward/backward + optimizer), after one warm-up step. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompt_key(ids, mask) -> list:
    """The unpadded prompt token ids of each row (to check both runs saw the same prompts in the same order)."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def load(args):
    """Pair, encoded prompts and the prompt order distillspec's DistillModule uses (seed 0, one rank)."""
    import torch

    torch.set_num_threads(args.threads)
    from distillspec.models.loading import PairSpec
    from distillspec.defaults import build_spec
    from distillspec.tasks.arithmetic import ArithmeticTask

    torch.manual_seed(0)
    pair = build_spec(PairSpec, draft=f"offline:smollm2-135m-L{args.draft_layers}", target="offline:smollm2-135m",
                      dtype="float32").load(torch.device("cpu"))
    task = ArithmeticTask(num_train=max((args.steps + 1) * args.batch // args.epochs, args.batch), num_eval=8, seed=1,
                          max_new_tokens=args.max_new_tokens)
    items = task.encode(task.load("train"), pair.tokenizer)
    # DistillModule.step_indices with seed=0, world=1, accumulate=1: step s takes perm[s*B:(s+1)*B] (epoch e: seed e).
    perm = [p for e in range(args.epochs + 1)
            for p in torch.randperm(len(items), generator=torch.Generator().manual_seed(e)).tolist()]
    return pair, items, perm


def run_ours(args) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from distillspec.evaluation import eos_token_ids
    from distillspec.lit.data import IndexDataset
    from distillspec.lit.train_module import DistillModule
    from distillspec.specs import ObjectiveSpec, RolloutSpec, TrainSpec
    from distillspec.defaults import build_spec

    pair, items, _ = load(args)
    eos = eos_token_ids(pair.tokenizer, pair.target)
    spec = build_spec(TrainSpec, max_steps=args.steps + 1, batch_size=args.batch, lr=1e-5, warmup_steps=0,
                      grad_clip=1.0, max_new_tokens=args.max_new_tokens, num_train=len(items))
    objective = build_spec(ObjectiveSpec, divergence="fkl", chunk_size=args.chunk_size)
    module = DistillModule(pair.draft, pair.target, items, objective,
                           build_spec(RolloutSpec, source=args.source, temperature=1.0, top_p=1.0, cache_store=False),
                           spec, eos, pair.tokenizer.pad_token_id, args.max_new_tokens, seed=0)
    clock = {"tokens": 0, "seqs": 0, "t0": None, "t1": None, "prompts": []}
    sample = module.sampler.sample

    def counting(ids, mask, *a, **kw):  # Rollout.lengths: tokens up to and including the first EOS
        clock["prompts"] += prompt_key(ids, mask)
        r = sample(ids, mask, *a, **kw)
        if clock["t0"] is not None and (not whole or clock["seqs"] < args.steps * args.batch):
            clock["tokens"] += r.num_tokens
            clock["seqs"] += int(r.lengths.numel())
        return r

    module.sampler.sample = counting

    whole = args.source == "fixed"
    if whole:
        clock["t0"] = time.perf_counter()

    class Clock(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if trainer.global_step == 1 and not whole:
                clock["t0"] = now
            clock["t1"] = now

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Clock()],
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(IndexDataset(args.steps + 1), batch_size=None))
    return {"tokens": clock["tokens"], "seqs": clock["seqs"], "seconds": clock["t1"] - clock["t0"], "eos": eos,
            "steps": trainer.global_step, "prompts": clock["prompts"]}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    pair, items, perm = load(args)
    eos = pair.tokenizer.eos_token_id
    # Pre-tokenised rows (a path DataCollatorForChatML supports; with completion_mask it takes the prompt ids from
    # input_ids, "prompt" text is only required by its key lookup): prompt = distillspec's exact prompt ids, the
    # dataset completion = the task's reference solution + EOS (only used for TRL's loss normaliser, see notes).
    rows = []
    whole = args.source == "fixed"
    for k in range((args.steps + 1) * args.batch):
        it = items[perm[k]]
        comp = list(it.target_ids or []) + [eos]
        rows.append({"prompt": it.prompt_text, "input_ids": list(it.input_ids) + comp,
                     "completion_mask": [0] * len(it.input_ids) + [1] * len(comp)})
    clock = {"tokens": 0, "seqs": 0, "t0": None, "t1": None, "prompts": []}
    original = GKDTrainer.generate_on_policy_outputs

    def counting(model, inputs, generation_config):  # TRL's own path (HF generate); labels != -100 = its tokens
        clock["prompts"] += prompt_key(inputs["prompts"], inputs["prompt_attention_mask"])
        ids, mask, labels = original(model, inputs, generation_config)
        if clock["t0"] is not None:
            clock["tokens"] += int((labels != -100).sum())
            clock["seqs"] += int(labels.shape[0])
        return ids, mask, labels

    GKDTrainer.generate_on_policy_outputs = staticmethod(counting)
    original_loss = GKDTrainer.compute_loss

    def counting_loss(self, model, inputs, *a, **kw):  # fixed data: the dataset completion's tokens
        if whole:
            n_seq = int(inputs["labels"].shape[0])
            clock["prompts"] += prompt_key(inputs["prompts"], inputs["prompt_attention_mask"])
            if clock["seqs"] < args.steps * args.batch:
                clock["tokens"] += int((inputs["labels"] != -100).sum())
                clock["seqs"] += n_seq
        return original_loss(self, model, inputs, *a, **kw)

    GKDTrainer.compute_loss = counting_loss

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            if whole:
                clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            if state.global_step == 1 and not whole:
                clock["t0"] = now
            clock["t1"] = now

    out_dir = tempfile.mkdtemp(prefix="bench_trl-")  # private and unpredictable, not a fixed shared /tmp path
    cfg = GKDConfig(output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                    learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, optim="adamw_torch", lmbda=0.0 if whole else 1.0, beta=0.0, temperature=1.0,
                    max_new_tokens=args.max_new_tokens, logging_steps=1000, save_strategy="no", report_to="none",
                    use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
                    gradient_accumulation_steps=1, seed=0, dataloader_num_workers=0,
                    train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = GKDTrainer(model=pair.draft, teacher_model=pair.target, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=pair.tokenizer, callbacks=[Clock()])
    gc = trainer.generation_config
    assert gc.do_sample and gc.temperature == 1.0 and gc.max_new_tokens == args.max_new_tokens and gc.use_cache
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    e = gc.eos_token_id
    return {"tokens": clock["tokens"], "seqs": clock["seqs"], "seconds": clock["t1"] - clock["t0"],
            "eos": [e] if isinstance(e, int) else list(e), "steps": trainer.state.global_step,
            "prompts": clock["prompts"]}


def child(args) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = run_ours(args) if args.impl == "ours" else run_trl(args)
    import torch

    from distillspec.jsonio import dumps

    out["threads"] = torch.get_num_threads()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json).write_text(dumps(out))  # strict: NaN -> null


def run_child(args, impl: str, json_path: Path) -> tuple[dict, tuple[float, float]]:
    """Run one implementation in its own process; its result (written to `json_path`, in a private temp dir)
    and the 1-min load average before/after."""
    cmd = [sys.executable, __file__, "--impl", impl, "--json", str(json_path), "--steps", str(args.steps), "--batch",
           str(args.batch), "--max-new-tokens", str(args.max_new_tokens), "--draft-layers",
           str(args.draft_layers), "--threads", str(args.threads),
           "--chunk-size", "none" if args.chunk_size is None else str(args.chunk_size),
           "--source", args.source, "--epochs", str(args.epochs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    la0 = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(json_path.read_text()), (la0, os.getloadavg()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=lambda s: None if s == "none" else int(s), default=1024,
                   help="div.chunk_size of our loss: rows per chunk of the memory-bounded path, or 'none' for plain "
                        "autograd (default 1024, the config default)")
    p.add_argument("--source", choices=["student", "fixed"], default="student",
                   help="student: on-policy samples (TRL lambda=1); fixed: dataset solutions (TRL lambda=0)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the prompts (--source fixed)")
    p.add_argument("--impl", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return child(args)
    rows, load = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:  # private (0700), removed at the end
        for impl in ("ours", "trl"):
            rows[impl], load[impl] = run_child(args, impl, Path(tmp) / f"{impl}.json")
    for impl, r in rows.items():
        assert r["steps"] == args.steps + 1 and r["seqs"] == args.steps * args.batch, (impl, r["steps"], r["seqs"])
    n = min(len(rows["ours"]["prompts"]), len(rows["trl"]["prompts"]))
    assert n >= args.steps * args.batch and rows["ours"]["prompts"][:n] == rows["trl"]["prompts"][:n], \
        "the two runs did not see the same prompts"
    print(f"\nsteps timed={args.steps} (after 1 warm-up) batch={args.batch} max_new_tokens={args.max_new_tokens} "
          f"student=first {args.draft_layers} layers, divergence=forward KL, CPU fp32, torch threads="
          f"{rows['ours']['threads']}/{rows['trl']['threads']} (ours/TRL), host cores={os.cpu_count()}\n")
    print("| implementation | completion tokens | mean len | seconds | s/step | tokens/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    names = {"ours": "distillspec DistillModule" + (" (teacher cached)" if args.source == "fixed" else ""),
             "trl": f"TRL GKDTrainer (lmbda={0 if args.source == 'fixed' else 1}, beta=0)"}
    print(f"source={args.source} epochs={args.epochs}" + (" (clock covers the whole fit, cache build included)"
                                                          if args.source == "fixed" else ""))
    for impl, r in rows.items():
        print(f"| {names[impl]} | {r['tokens']} | {r['tokens'] / r['seqs']:.1f} | {r['seconds']:.1f} | "
              f"{r['seconds'] / args.steps:.2f} | {r['tokens'] / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    tps = {k: r["tokens"] / r["seconds"] for k, r in rows.items()}
    print(f"\nthroughput ratio ours/TRL: {tps['ours'] / tps['trl']:.2f}x; peak RSS ratio ours/TRL: "
          f"{rows['ours']['peak_rss_mb'] / rows['trl']['peak_rss_mb']:.2f}\n")
    print(f"Notes: EOS ids ours={rows['ours']['eos']} TRL={rows['trl']['eos']}; tokens counted up to and including "
          "the first EOS (rows that hit the cap count max_new_tokens). Both sample the student at T=1, top_p=1 "
          "(TRL: HF generate, top_k=0, KV cache on). Sampled lengths differ between runs, so compare tokens/s, "
          "not totals. TRL normalises its loss by the dataset completion's token count (num_items_in_batch from "
          "the collated batch), not the on-policy one; this changes the loss scale, not the work per step. "
          f"1-min load average before/after each run: ours {load['ours'][0]:.2f}/{load['ours'][1]:.2f}, "
          f"TRL {load['trl'][0]:.2f}/{load['trl'][1]:.2f} on {os.cpu_count()} cores (this benchmark itself adds about 1; "
          "anything beyond that is other jobs competing for the CPU, so timings are noisy).")


if __name__ == "__main__":
    main()
