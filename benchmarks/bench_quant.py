"""The teacher in 8-bit (bitsandbytes LLM.int8()) or 4-bit vs full precision, on the offline SmolLM2 target.

    python benchmarks/bench_quant.py                        # 8 x 128 tokens, fp32 vs 8bit (~2 min, 1 thread)
    python benchmarks/bench_quant.py --quant 8bit 4bit      # also 4-bit (NF4)
    python benchmarks/bench_quant.py --batch 2 --tokens 64 --repeats 1 --json out.json

What is measured, per model (the same target loaded as `pair.target_quantization` loads it, via
distillspec.models.loading.load_model on the CPU, dtype float32):
  memory     bytes of the weights as loaded: every distinct tensor of the state dict (tied embedding/head
             counted once; the int8 weights' float32 row scales SCB included), and the estimate
             distillspec.planning.weight_bytes makes for the same model
  time       seconds per teacher forward (no_grad, logits of every position, as the teacher scoring does)
             at --batch x --tokens, median of --repeats after one warm-up call; torch threads: --threads
  agreement  against the float32 model on the same batch: |log p(x_t) - log p'(x_t)| of the observed next
             token (max, mean), the total-variation distance 0.5 * sum_v |p(v) - p'(v)| of the next-token
             distributions (mean, max), and how often both pick the same argmax
The text is real: GSM8K training questions and answers (../shared/data/gsm8k/train.jsonl beside the repo)
when present, else the built-in English passage below, cut into --batch windows of --tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # sd_table, also when imported (tests/test_quantization.py)

from sd_table import cpu_name  # noqa: E402 - the same machine line as bench_sd's tables

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
# A fallback text (written for this benchmark): plain English prose and a little arithmetic.
PASSAGE = (
    "The village sat at the bend of a slow river, and every morning the baker opened his shop before the sun "
    "had cleared the hills. He sold bread to the farmers on their way to the fields, and in the afternoon he "
    "sold cakes to the children coming home from school. One spring the river rose higher than anyone could "
    "remember. The water covered the lower road and reached the steps of the church, so the farmers stayed "
    "at home and the school closed for a week. The baker still baked, because he did not know what else to "
    "do, and he carried the loaves up the hill in a basket to the houses that the flood had cut off. "
    "A loaf cost three coins, and on the first day he gave away forty loaves, which he would otherwise have "
    "sold for one hundred and twenty coins. When the water went down, the families he had fed came to the "
    "shop with the money they owed him, and some of them brought more than they owed. Question: if he gave "
    "away forty loaves on each of five days, how many loaves did he give away in total? Answer: forty times "
    "five is two hundred, so he gave away two hundred loaves. The next year the village built a wall along "
    "the river, and the baker's oldest daughter, who had carried the second basket, became the baker. "
)


def real_text(min_chars: int) -> tuple[str, str]:
    """(text of at least min_chars characters, its source)."""
    if GSM8K.is_file():
        parts, n = [], 0
        with GSM8K.open() as f:
            for line in f:
                row = json.loads(line)
                parts.append(f"Question: {row['question']}\nAnswer: {row['answer']}\n")
                n += len(parts[-1])
                if n >= min_chars:
                    break
        return "".join(parts), "GSM8K train (first rows)"
    return PASSAGE * (min_chars // len(PASSAGE) + 1), "built-in passage"


def windows(tokenizer, batch: int, tokens: int) -> tuple[torch.Tensor, str]:
    """(batch, tokens) ids: consecutive windows of the tokenized text."""
    text, source = real_text(batch * tokens * 8)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= batch * tokens, (ids.numel(), batch * tokens)
    return ids[: batch * tokens].view(batch, tokens), source


def weight_bytes_loaded(model) -> int:
    """Bytes of every distinct tensor in the state dict (storage shared by tied weights counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def agreement(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Observed-token |delta log p| (max, mean), TV of the next-token distributions (mean, max), argmax match."""
    lp_ref = torch.log_softmax(ref_logits[:, :-1].float(), -1)
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    nxt = ids[:, 1:, None]
    d_obs = (lp_ref.gather(-1, nxt) - lp.gather(-1, nxt)).abs()
    tv = 0.5 * (lp_ref.exp() - lp.exp()).abs().sum(-1)
    return {"obs_logp_abs_max": d_obs.max().item(), "obs_logp_abs_mean": d_obs.mean().item(),
            "tv_mean": tv.mean().item(), "tv_max": tv.max().item(),
            "argmax_agree": (lp_ref.argmax(-1) == lp.argmax(-1)).float().mean().item(),
            "positions": int(tv.numel())}


@torch.no_grad()
def timed_forward(model, ids: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask).logits  # warm-up; also the logits compared
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        times.append(time.perf_counter() - t0)
    return logits, statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="offline:smollm2-135m")
    ap.add_argument("--quant", nargs="+", default=["8bit"], choices=["8bit", "4bit"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from importlib.metadata import version

    from distillspec.models.loading import load_model, load_tokenizer, resolve_model_path
    from distillspec.models.shapes import count_parameters
    from distillspec.planning import weight_bytes

    path = resolve_model_path(args.model)
    ids, source = windows(load_tokenizer(path), args.batch, args.tokens)
    from transformers import AutoConfig

    pc = count_parameters(AutoConfig.from_pretrained(path))
    res: dict = {"machine": {"cpu": cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__,
                             "bitsandbytes": version("bitsandbytes"), "transformers": version("transformers")},
                 "model": args.model, "batch": args.batch, "tokens": args.tokens, "text": source, "rows": {}}
    ref = None
    for quant in [None, *args.quant]:
        name = quant or "float32"
        model = load_model(path, dtype="float32", quantization=quant, device="cpu")
        logits, sec = timed_forward(model, ids, args.repeats)
        row = {"weights_mib": weight_bytes_loaded(model) / 2**20,
               "planned_mib": weight_bytes(pc, "float32", quant) / 2**20,
               "logits_dtype": str(logits.dtype).removeprefix("torch."), "forward_s": sec}
        if ref is None:
            ref = logits
        else:
            row.update(agreement(ref, logits, ids))
            row["speed_vs_fp32"] = res["rows"]["float32"]["forward_s"] / sec
        res["rows"][name] = row
        del model
        print(name, json.dumps(row), flush=True)

    m = res["machine"]
    print(f"\n{args.model}, {args.batch} x {args.tokens} tokens of {source}; {m['cpu']}, {args.threads} thread(s), "
          f"torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, transformers {m['transformers']}\n")
    print("| teacher | weights (MiB) | planner's estimate (MiB) | forward (s) | obs. token abs(dlog p) max / mean "
          "| TV mean / max | same argmax |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res["rows"].items():
        agree = (f"{r['obs_logp_abs_max']:.3f} / {r['obs_logp_abs_mean']:.4f} | {r['tv_mean']:.4f} / "
                 f"{r['tv_max']:.3f} | {100 * r['argmax_agree']:.1f} %") if "tv_mean" in r else "- | - | -"
        print(f"| {name} | {r['weights_mib']:.0f} | {r['planned_mib']:.0f} | {r['forward_s']:.2f} | {agree} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
