"""The prepared GPU check: full-size shapes, random weights, one run of a few minutes on one GPU.

    python benchmarks/gpu_check.py                    # on a CUDA machine (sized for ~6-7 min on an H100; estimated)
    python benchmarks/gpu_check.py --json $OUT/gpu_check.json --budget-s 400
    python benchmarks/gpu_check.py --smoke            # the same code on CPU with tiny shapes (seconds; in make test)
    python benchmarks/gpu_check.py --sections rollout # one section (the rollout one: vLLM servers, cap 150 s)
    make gpu-check ARGS="--json /path/out.json"

Nothing is downloaded: models are built from the configs in distillspec/models/configs (Qwen3-0.6B / 4B,
SmolLM-360M / 1.7B shapes) with random weights, in bf16 directly on the GPU. Sections (each guarded by a
time budget; a section that fails is reported and the others still run):
  1. decode   forced-acceptance speed table (gpucheck/decode.py): SD all/none accepted vs target-only
              vs HF generate / assisted generation, B = 1 and 16, per-call costs, c, the engine's GPU goals;
              our rows on the dynamic KV cache, the static one, and (CUDA) static + CUDA graphs
  2. equal    greedy SD == greedy target decoding on the GPU, fp32 (gpucheck/checks.py), per cache path
  3. loss     chunked loss peak memory on the 151,936 vocabulary, B x T = 16 x 312 (gpucheck/checks.py)
  4. train    on-policy distillation steps, 0.6B student / 4B teacher: tokens/s, peak memory; 8-bit teacher
              with bitsandbytes; TRL GKDTrainer with trl + datasets (gpucheck/train.py)
  5. rollout  generation on vLLM (gpucheck/rollout.py): teacher data tokens/s, ours (TeacherCache.build)
              vs a vLLM teacher server; on-policy steps hf vs a vLLM student server (step s, weight-sync s,
              rollout tokens/s); the training process's peak GPU memory, teacher in process vs served. Needs a
              serving python with CUDA vLLM (DISTILLSPEC_VLLM_PYTHON, else .venv-vllm/bin/python); without one,
              or without CUDA, its status says "skipped: <reason>". --smoke skips it (two vLLM CPU start-ups
              take minutes); --smoke --rollout-vllm runs it on CPU with tiny shapes (make test-vllm does)
  6. decode   the SmolLM pair, our engine only, if time is left
Needs torch, transformers, lightning (present on the project's GPU machines); optional wheels to bring for
the optional rows: bitsandbytes (8-bit teacher), trl + datasets (TRL comparison); a vLLM env for the rollout
section. No hydra/omegaconf.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's distillspec, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpucheck/
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # the rollout section's vLLM servers: no network here

OPTIONAL = ("lightning", "peft", "bitsandbytes", "trl", "datasets")
# section -> wall-clock cap in seconds (full run); the overall --budget-s bounds them all
CAPS = {"decode": 210, "equal": 45, "loss": 40, "train": 120, "rollout": 150, "decode_smollm": 120}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32: the code path in seconds")
    p.add_argument("--json", default="gpu_check.json", help="where to write the results (default ./gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=400.0, help="overall wall-clock budget after start-up")
    p.add_argument("--sections", nargs="+", default=None, choices=list(CAPS),
                   help="default: all (smoke: all but decode_smollm, the same code as decode)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate / assisted rows")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL comparison even when trl imports")
    p.add_argument("--rollout-vllm", action="store_true",
                   help="with --smoke: run the rollout section's vLLM servers on CPU (minutes; needs .venv-vllm)")
    args = p.parse_args(argv)
    if args.sections is None:
        args.sections = [s for s in CAPS if not (args.smoke and s == "decode_smollm")]
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.rollout_vllm and not args.smoke:
        p.error("--rollout-vllm is for --smoke runs (on a CUDA machine the rollout section runs whenever the "
                "serving python imports vLLM)")
    return args


def settings(smoke: bool) -> dict:
    """Per-section keyword arguments: the full sizes, or tiny ones for --smoke."""
    if smoke:
        return {"decode": dict(batch_sizes=(1, 3), prompt_len=12, new_tokens=8, gamma=3, b1_prompts=1, repeats=1),
                "equal": dict(batch=4, prompt_len=12, new_tokens=16, gamma=3),
                "loss": dict(batch=2, tokens=8, vocab=512),
                "train": dict(batch=2, prompt_len=8, new_tokens=8, steps=1),
                "rollout": dict(prompts=4, prompt_len=8, new_tokens=8, top_k=16, data_batch=2, step_batch=2,
                                step_new_tokens=8, rounds=1)}
    return {"decode": dict(batch_sizes=(1, 16), prompt_len=128, new_tokens=128, gamma=5, b1_prompts=2, repeats=10),
            "equal": dict(batch=8, prompt_len=64, new_tokens=64, gamma=5),
            "loss": dict(batch=16, tokens=312, vocab=151_936),
            "train": dict(batch=8, prompt_len=64, new_tokens=128, steps=2),
            "rollout": dict(prompts=96, prompt_len=64, new_tokens=64, top_k=64, data_batch=48, step_batch=16,
                            step_new_tokens=128, rounds=2)}


def environment(ctx) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(ctx.device), "dtype": str(ctx.dtype), "smoke": ctx.smoke,
           "optional": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL}}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 1024 ** 3, cuda=torch.version.cuda)
    return env


def report(results: dict) -> str:
    """The printed tables (Markdown)."""
    from gpucheck.common import md_table

    out = [f"# GPU check ({'SMOKE: CPU, tiny shapes; not a measurement' if results['env']['smoke'] else 'full'})",
           json.dumps(results["env"])]
    for key in ("decode", "decode_smollm"):
        d = results.get(key)
        if isinstance(d, dict) and "rows" in d:
            out.append(f"\n## Decoding, forced acceptance: {d['pair']} ({' -> '.join(d['shapes'])}), {d['settings']}")
            out.append(md_table(["method", "B", "prompts", "tokens", "s", "tok/s", "vs target-only", "alpha", "tau",
                                 "bookkeeping", "= target"],
                                [[r["method"], r["B"], r["prompts"], r["tokens"], r["seconds"], r["tokens_per_s"],
                                  r.get("speedup_vs_target"), r.get("alpha"), r.get("tau"), r.get("bookkeeping"),
                                  r.get("same_as_target")] for r in d["rows"]]))
            if d["costs"]:
                keys = [k for k in d["costs"][0] if k != "B"]
                out.append("\nper-call costs (median):\n" + md_table(["B"] + keys, [[c["B"]] + [c[k] for k in keys]
                                                                                    for c in d["costs"]]))
            out.append("\n" + md_table(["goal", "target", "measured", "result"],
                                       [[g["goal"], g["target"], g["measured"], g["pass"]] for g in d["goals"]]))
    if isinstance(results.get("equal"), dict) and "rows" in results["equal"]:
        e = results["equal"]
        out.append(f"\n## Greedy equality (fp32, {e['shape']}, draft = target + head noise {e['head_noise']}, B={e['B']}, "
                   f"{e['new_tokens']} tokens): SD == target-only {e['sd_equals_target']}/{e['rows']} rows, "
                   f"target-only == HF generate {e['target_equals_hf']}/{e['rows']}, alpha {e['alpha']:.3f}"
                   + "".join(f"; {k.replace('_', ' ')} {e[k]}/{e['rows']}" for k in e
                             if k.endswith("_equals_target") and k != "sd_equals_target"))
    if isinstance(results.get("loss"), list):
        out.append("\n## Loss memory\n" + md_table(
            ["divergence", "B", "T", "V", "chunk", "peak above inputs GiB", "grad GiB", "s", "note"],
            [[r["divergence"], r["B"], r["T"], r["V"], r["chunk_size"], r.get("peak_above_inputs_gib"),
              r.get("grad_gib"), r.get("seconds"), r.get("skipped", "")] for r in results["loss"]]))
    if isinstance(results.get("train"), dict) and "rows" in results["train"]:
        t = results["train"]
        out.append(f"\n## Distillation step ({' <- '.join(t['shapes'])})\n" + md_table(
            ["implementation", "batch", "new tokens", "steps", "tokens", "s", "tok/s", "peak GiB"],
            [[r["implementation"], r["batch"], r["new_tokens"], r["steps"], r["completion_tokens"], r["seconds"],
              r["tokens_per_s"], r["peak_gib"]] for r in t["rows"]]) + "".join(f"\nskipped: {s}" for s in t["skipped"]))
    if isinstance(results.get("rollout"), dict) and "status" in results["rollout"]:
        out.append(rollout_report(results["rollout"]))
    for key, val in results.items():
        if isinstance(val, dict) and "error" in val:
            out.append(f"\n## {key}: ERROR\n{val['error']}")
        if isinstance(val, dict) and val.get("skipped") and (key.startswith("decode") or set(val) == {"skipped"}):
            out.append(f"\n{key} skipped by the time guard: {', '.join(val['skipped'])}")
    return "\n".join(out)


def rollout_report(r: dict) -> str:
    """The rollout section's table (or its skip reason)."""
    from gpucheck.common import md_table

    head = f"\n## Rollouts on vLLM ({' <- '.join(r['shapes'])}): {r['status']}"
    if not r["rows"]:
        return head + "".join(f"\nskipped: {s}" for s in r["skipped"])
    cols = ["tokens", "seconds", "tokens_per_s", "step_s", "sync_s", "teacher_score_s", "peak_gib"]
    table = md_table(["part", "configuration", "tokens", "s", "tok/s", "step s", "sync s", "teacher s", "peak GiB",
                      "note"], [[x["part"], x["configuration"], *(x.get(c) for c in cols), x.get("note", "")]
                                for x in r["rows"]])
    starts = r.get("server_start_s") or {}
    extra = {"vLLM": r.get("vllm"), "server start s": ", ".join(f"{k} {v:.0f}" for k, v in starts.items()) or None,
             "student syncs": r.get("student_syncs"),
             "teacher freed before the served rows": r.get("teacher_freed"),
             **{k: v for k, v in r["summary"].items() if v is not None}}
    return "\n".join([head, table, "; ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in extra.items() if v is not None)]
                     + [f"skipped: {s}" for s in r["skipped"]] + [f"FAILED: {e}" for e in r["errors"]])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from gpucheck import checks, decode, rollout, train
    from gpucheck.common import Ctx, TimeGuard

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: the full check needs a CUDA GPU (none is visible). Run `--smoke` for the CPU code path.",
              file=sys.stderr)
        return 2
    ctx = Ctx(device=torch.device("cpu") if args.smoke else torch.device("cuda", 0),
              dtype=torch.float32 if args.smoke else torch.bfloat16, smoke=args.smoke)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest and spares a shared machine
    guard, kw = TimeGuard(args.budget_s), settings(args.smoke)
    results: dict = {"env": environment(ctx), "budget_s": args.budget_s, "gpu_run": ctx.device.type == "cuda"}
    jobs = {
        "decode": lambda g: decode.run(ctx, g, pair="qwen3", hf=not args.no_hf, **kw["decode"]),
        "equal": lambda g: checks.greedy_equality(ctx, g, **kw["equal"]),
        "loss": lambda g: checks.loss_memory(ctx, g, **kw["loss"]),
        "train": lambda g: train.run(ctx, g, trl=not args.no_trl, **kw["train"]),
        "rollout": lambda g: rollout.run(ctx, g, cpu_vllm=args.rollout_vllm, **kw["rollout"]),
        "decode_smollm": lambda g: decode.run(ctx, g, pair="smollm", hf=False, **kw["decode"]),
    }
    failed = []
    for name in args.sections:
        if guard.left() <= 0:
            results[name] = {"skipped": ["time guard (overall budget spent)"]}
            continue
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ({guard.left():.0f} s left)", file=sys.stderr, flush=True)
        try:
            results[name] = jobs[name](guard.sub(CAPS[name]))
        except Exception:  # report it and go on with the other sections
            results[name] = {"error": traceback.format_exc()[-3000:]}
            failed.append(name)
        if isinstance(results[name], dict) and results[name].get("errors"):  # parts of a section that failed
            failed.append(f"{name} ({len(results[name]['errors'])} part(s))")
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    results["total_seconds"] = time.perf_counter() - guard.t0
    text = report(results)
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    from distillspec.jsonio import dumps

    Path(args.json).write_text(dumps(json.loads(json.dumps(results, default=str)), indent=2))  # strict: NaN -> null
    print(f"\n[gpu_check] wrote {args.json}; {len(failed)} section(s) failed{': ' + ', '.join(failed) if failed else ''}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
