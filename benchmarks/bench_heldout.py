"""The held-out acceptance measure against SD's measured acceptance, on the same prompts.

    python benchmarks/bench_heldout.py                                  # SmolLM2-135M and its 4 / 15 / 25-layer drafts
    python benchmarks/bench_heldout.py --target offline:qwen2.5-coder-1.5b --drafts offline:qwen2.5-coder-0.5b \
        --num-prompts 16 --new-tokens 64
    python benchmarks/bench_heldout.py ... --precisions fp32 bf16 --temperature 0   # precision vs alpha

For each draft, on the first --num-prompts GSM8K test questions (seeded shuffle, chat template):
  * alpha_heldout (distillspec.heldout): teacher-forced along stored target samples at the SD setting, one draft
    forward per batch; the target samples are made once (timed separately) and shared by every draft;
  * SD's alpha_expected and alpha_tok from an SD evaluation (distillspec.evaluation.SDEvaluator, acceptance only).
Each with its 95 % bootstrap CI over prompts, and the seconds each took. Default setting: T 0.6, top-p 0.95,
gamma 5 (the reference study's GSM8K setting); --temperature 0 for greedy. --precisions repeats both measures
with both models' weights in float32 (fp32) or bfloat16 (bf16); the target samples are always the float32
target's. (Autocast does not apply: every evaluation runs in the models' own dtypes, autocast off.) --skip-sd: the held-out measure only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def log(msg: str) -> None:
    print(f"[bench_heldout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="offline:smollm2-135m")
    p.add_argument("--drafts", nargs="+", default=[f"offline:smollm2-135m-L{n}" for n in (4, 15, 25)])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K test JSONL")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--skip-sd", action="store_true")
    return p.parse_args(argv)


def sd_eval(draft, target, tok, task, items, args):
    """SD's acceptance on `items` -> ({name: (value, lo, hi)}, seconds)."""
    from distillspec import constants as C
    from distillspec.evaluation import SDEvaluator
    from distillspec.sd.metrics import RATIO_PARTS, bootstrap_ci
    from distillspec.specs import SDSpec
    from distillspec.defaults import build_spec

    top_p = args.top_p if args.temperature > 0 else 1.0
    spec = build_spec(SDSpec, gamma=args.gamma, temperature=args.temperature, top_p=top_p, batch_size=args.batch,
                      num_eval=len(items), max_new_tokens=args.new_tokens, measure_speedup=False, compute_quality=False)
    t0 = time.perf_counter()
    report = SDEvaluator(draft, target, tok, spec, task, items, args.new_tokens, args.seed).run(target.device)
    secs = time.perf_counter() - t0
    out = {}
    for key in (C.ALPHA_EXPECTED, C.ALPHA_TOK):
        num, den = RATIO_PARTS[key]
        out[key] = (report.metrics[key], *bootstrap_ci([r[num] for r in report.per_example],
                                                       [r[den] for r in report.per_example]))
    return out, secs


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from distillspec import constants as C
    from distillspec import heldout
    from distillspec.evaluation import eos_token_ids
    from distillspec.models.loading import load_model, load_tokenizer
    from distillspec.tasks.gsm8k import GSM8KTask

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.target)
    task = GSM8KTask(source="local", path=args.data)
    items = task.encode(task.load("eval"), tok, limit=args.num_prompts, seed=args.seed)
    target = load_model(args.target, dtype="float32")
    top_p = args.top_p if args.temperature > 0 else 1.0
    t0 = time.perf_counter()
    cache = heldout.build_heldout(target, items, temperature=args.temperature, top_p=top_p,
                                  max_new_tokens=args.new_tokens, eos_ids=eos_token_ids(tok, target),
                                  pad_id=tok.pad_token_id, device=target.device, seed=args.seed,
                                  batch_size=args.batch, progress=True)
    log(f"target samples of {len(items)} prompts: {time.perf_counter() - t0:.1f} s")
    rows = []
    nan = (float("nan"),) * 3
    for precision in args.precisions:
        dtype = "bfloat16" if precision == "bf16" else "float32"
        sd_target = target if dtype == "float32" else load_model(args.target, dtype=dtype)
        for name in args.drafts:
            draft = load_model(name, dtype=dtype)
            t0 = time.perf_counter()
            h = heldout.measure(draft, cache, temperature=args.temperature, top_p=top_p, device=target.device,
                                batch_size=args.batch).metrics
            h_secs = time.perf_counter() - t0
            sd, sd_secs = ({C.ALPHA_EXPECTED: nan, C.ALPHA_TOK: nan}, 0.0) if args.skip_sd else \
                sd_eval(draft, sd_target, tok, task, items, args)
            rows.append((f"{name} ({precision})", h, h_secs, sd, sd_secs))
            log(f"{name} {precision}: heldout {h[C.ALPHA_HELDOUT]:.4f} ({h_secs:.0f} s), SD alpha_expected "
                f"{sd[C.ALPHA_EXPECTED][0]:.4f} alpha_tok {sd[C.ALPHA_TOK][0]:.4f} ({sd_secs:.0f} s)")
            del draft
        del sd_target
    print(f"\n{args.target}, {len(items)} GSM8K test prompts x {args.new_tokens} tokens, T {args.temperature}, "
          f"top-p {top_p}, gamma {args.gamma}, seed {args.seed}\n")
    print("| draft | α_heldout [95 % CI] | SD α_expected [95 % CI] | SD α_tok [95 % CI] | held-out s | SD s | "
          "nucleus beyond top-k |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fmt = "{:.3f} [{:.3f}, {:.3f}]".format
    for name, h, h_secs, sd, sd_secs in rows:
        print(f"| {name} | {fmt(h[C.ALPHA_HELDOUT], h[C.ALPHA_HELDOUT_LO], h[C.ALPHA_HELDOUT_HI])} | "
              f"{fmt(*sd[C.ALPHA_EXPECTED])} | {fmt(*sd[C.ALPHA_TOK])} | {h_secs:.0f} | {sd_secs:.0f} | "
              f"{h[C.HELDOUT_TRUNCATED]:.4f} |")


if __name__ == "__main__":
    main()
