"""One draft's training step against a sparse (top-64) teacher, per precision: seconds per step and peak RSS.

    python benchmarks/bench_draft_step.py                                        # the 0.5B Qwen draft, 4 x 256
    python benchmarks/bench_draft_step.py --precisions fp32 bf16-autocast bf16 --chunk-sizes 256 --steps 3
    python benchmarks/bench_draft_step.py --draft offline:smollm2-135m-L4 --batch 8 --completion-tokens 48
    python benchmarks/bench_draft_step.py --precisions bf16-autocast --completion-tokens 128 --trim-blocks 3

The step is the training step of teacher-data runs (rollout=teacher, the sparse teacher: distillspec.lit's
sparse path): the draft's final hidden states at the completion positions (distillspec.models.forward.
completion_hidden), the sparse loss mapping --chunk-size positions at a time to full-vocabulary logits
(distillspec.losses.sparse, forward KL), backward, gradient clipping at 1.0, AdamW. Inputs: --batch GSM8K train
prompts through the chat template, each followed by --completion-tokens tokens, and a teacher top-64 per position
(both random: the step's cost does not depend on their values). Precisions: fp32 (float32 weights and compute),
bf16-autocast (float32 weights, torch.autocast bfloat16 compute), bf16 (bfloat16 weights and AdamW state).

Each (precision, chunk size) runs in its own subprocess: its peak RSS (ru_maxrss from wait4) is that process's
whole peak, model and optimizer state included. The first step is a warm-up, left out of the time.

--trim-blocks R measures what handing freed memory back to the OS after each step costs (distillspec.memory.
trim_heap, which training runs after every optimizer step): in one process, R rounds of two steps without the trim
then two steps with it; the second step of each pair is kept (it starts from its arm's state: the freed pages
resident, or handed back and faulted in again), its time including its own trim, beside the RSS after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
PRECISIONS = ("fp32", "bf16-autocast", "bf16")


def batch(tok, args, vocab: int):
    """A Rollout of --batch GSM8K prompts + random completions, and a random sorted top-64 teacher: (rollout,
    (B, T, 64) ids, (B, T, 64) log-probs, (B, T) tail log-mass)."""
    import torch

    from distillspec.lit.data import left_pad
    from distillspec.rollout.sequences import assemble
    from distillspec.tasks.gsm8k import GSM8KTask

    task = GSM8KTask(source="local", path=str(GSM8K_TRAIN), train_path=str(GSM8K_TRAIN))
    items = task.encode(task.load("train"), tok, limit=args.batch, seed=0)
    ids, mask = left_pad([it.input_ids for it in items], tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    T = args.completion_tokens
    comp = torch.randint(0, vocab, (args.batch, T), generator=g)
    roll = assemble(ids, mask, comp, torch.full((args.batch,), T), tok.pad_token_id, "teacher")
    idx = torch.randint(0, vocab, (args.batch, T, 64), generator=g)  # 90 % of the mass on 64 ids, 10 % elsewhere
    logp = (torch.softmax(torch.randn(args.batch, T, 64, generator=g) * 2, -1) * 0.9).log().sort(-1, True).values
    return roll, idx, logp, torch.full((args.batch, T), 0.1).log()


def worker(args) -> dict:
    import torch

    from distillspec.losses.sparse import sparse_divergence_loss
    from distillspec.memory import trim_heap
    from distillspec.models.forward import completion_hidden
    from distillspec.models.loading import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    p = args.worker
    model = load_model(args.draft, dtype="bfloat16" if p == "bf16" else "float32", trainable=True,
                       gradient_checkpointing=args.gradient_checkpointing)
    model.train()
    tok = load_tokenizer(args.draft)
    roll, idx, logp, tail = batch(tok, args, model.get_output_embeddings().weight.shape[0])
    mask = roll.completion_mask()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    times, trimmed, rss = [], [], []
    arms = [arm for _ in range(args.trim_blocks) for arm in (False, False, True, True)] or [False] * args.steps
    for trim in arms:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16-autocast"):
            hidden, head = completion_hidden(model, roll)
            loss, _ = sparse_divergence_loss(hidden, idx, logp, mask, "fkl", chunk_size=args.chunk_size,
                                             tail_logp=tail, to_logits=head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if trim:
            trim_heap()
        times.append(time.perf_counter() - t0)
        trimmed.append(trim)
        rss.append(current_rss_gib())
    if args.trim_blocks:
        kept = range(1, len(arms), 2)  # the second step of each pair
        arm = {t: [i for i in kept if trimmed[i] == t] for t in (False, True)}
        return {"loss": float(loss), "tokens": int(mask.sum()),
                **{f"{name}_{k}": sum(v[i] for i in arm[t]) / len(arm[t])
                   for t, name in ((False, "keep"), (True, "trim")) for k, v in (("s", times), ("rss", rss))}}
    timed = times[1:] or times
    return {"step_s": sum(timed) / len(timed), "first_step_s": times[0], "loss": float(loss),
            "tokens": int(mask.sum())}


def current_rss_gib() -> float:
    """This process's resident memory now, GiB (from /proc/self/statm; 0.0 where it is absent)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


def run(precision: str, chunk: int, args) -> dict:
    argv = [sys.executable, __file__, "--worker", precision, "--chunk-sizes", str(chunk), "--draft", args.draft,
            "--batch", str(args.batch), "--completion-tokens", str(args.completion_tokens), "--steps",
            str(args.steps), "--threads", str(args.threads), "--trim-blocks", str(args.trim_blocks)]
    argv += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        return {"failed": (errors.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(text.strip().splitlines()[-1]), "rss_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="offline:qwen2.5-coder-0.5b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--completion-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per configuration, the first a warm-up")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16-autocast"])
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--trim-blocks", type=int, default=0,
                    help="rounds of 2 steps without, then 2 with, the heap trim after each step (0: off)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.chunk_size = args.chunk_sizes[0]
        print(json.dumps(worker(args)))
        return
    print(f"{args.draft}: batch {args.batch} x {args.completion_tokens} completion tokens, sparse top-64 fkl, "
          f"AdamW, {args.steps} steps (first left out), {args.threads} threads"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}\n")
    if args.trim_blocks:
        trim_table(args)
        return
    print("| precision | chunk (positions) | s / step | tokens/s | first step s | peak RSS GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for precision in args.precisions:
        for chunk in args.chunk_sizes:
            r = run(precision, chunk, args)
            if "failed" in r:
                print(f"| {precision} | {chunk} | FAILED: {r['failed']} | | | |", flush=True)
                continue
            print(f"| {precision} | {chunk} | {r['step_s']:.1f} | {r['tokens'] / r['step_s']:.0f} | "
                  f"{r['first_step_s']:.1f} | {r['rss_gib']:.2f} |", flush=True)


def trim_table(args) -> None:
    """Per precision: the step without and with the heap trim after it, their ratio, and RSS after each."""
    print(f"heap trim after each step: {args.trim_blocks} rounds, the second step of each pair kept\n")
    print("| precision | s / step, no trim | s / step, trim | trim / no trim | RSS GiB, no trim | RSS GiB, trim |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for precision in args.precisions:
        r = run(precision, args.chunk_sizes[0], args)
        if "failed" in r:
            print(f"| {precision} | FAILED: {r['failed']} | | | | |", flush=True)
            continue
        print(f"| {precision} | {r['keep_s']:.2f} | {r['trim_s']:.2f} | {r['trim_s'] / r['keep_s']:.3f} | "
              f"{r['keep_rss']:.2f} | {r['trim_rss']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
