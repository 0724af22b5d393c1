"""Section 1: decoding speed with forced acceptance.

Target and drafts are real-size random models with every layer's o_proj/down_proj zeroed
(`common.force_token_map`), so each model's next token is a fixed function of its input token:
  * draft = the target itself  -> every drafted token is accepted (alpha = 1, tau = gamma + 1);
  * draft = the small model    -> a different random map, so blocks are rejected at once (alpha ~ 1/V).
Random weights make alpha meaningless otherwise; here the speed is what is measured.

Rows, at each batch size B (B = 1: the prompts one at a time; B > 1: one left-padded ragged batch), greedy,
no EOS (every row generates exactly new_tokens tokens):
  target-only, ours (distillspec.sd.baseline.autoregressive_generate, KV cache)   = the speedup reference
  target-only, HF generate
  SD ours, all accepted / none accepted (distillspec.sd.engine.SpeculativeDecoder, gamma)
  HF assisted generation (assistant_model=..., num_assistant_tokens=gamma, constant schedule), both
  paths; HF supports batch 1 only, so it is measured at B = 1 and its tokens/s is what a B-row loop gets.
  the same three rows of ours with kv="static" (preallocated KV cache, fixed shapes per call width) and, on
  CUDA only, kv="static" + compile=True (torch.compile mode="reduce-overhead": CUDA graphs); the compiled
  rows warm up with the full generation length, so the timed run reuses the recorded graphs.
Per-call costs (median of repeated calls on a prefilled cache), per cache path: draft forward (1 position),
target decode step (1 position), target verify (gamma + 1 positions); c = draft / target step, verify
ratio = verify / target step.
"""

from __future__ import annotations

import statistics

import torch

from gpucheck.common import PAIRS, Ctx, TimeGuard, batches, build, force_token_map, ragged_prompts, release, timed

# The engine's GPU goals: (label, row key of the measured ratio, comparison, threshold)
GOALS = [
    ("B=1: SD all-accepted / target-only (ours)", "b1_sd_vs_target", ">=", 3.0),
    ("B=1: SD all-accepted / HF assisted all-accepted", "b1_sd_vs_hf", ">=", 2.0),
    ("B=16: SD all-accepted / target-only (ours)", "bN_sd_vs_target", ">=", 2.0),
    ("c = draft forward / target decode step (B=1)", "c_b1", "<=", 0.25),
    ("B=1: SD all-accepted / target-only, both static KV", "b1_static", ">=", 3.0),
    ("B=1: SD all-accepted / target-only, both static KV + CUDA graphs", "b1_graph", ">=", 3.0),
    ("B=1: SD all-accepted, static KV + CUDA graphs / target-only (ours)", "b1_graph_vs_target", ">=", 3.0),
    ("c, static KV + CUDA graphs (B=1)", "c_b1_graph", "<=", 0.25),
]
# cache paths: (row-key suffix, label, kv, compile)
PATHS = [("", "", "dynamic", False), ("_static", "static KV", "static", False),
         ("_graph", "static KV + CUDA graphs", "static", True)]


def _rows_of(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [tokens[i, : int(lengths[i])].tolist() for i in range(tokens.shape[0])]


def ours_target(ctx, target, prompts, batch, n, kv="dynamic", compile=False):
    from distillspec.sd.baseline import autoregressive_generate

    out = []
    for ids, mask in batches(ctx, prompts, batch):
        r = autoregressive_generate(target, ids, mask, n, temperature=0.0, eos_token_id=None, pad_token_id=0,
                                    kv=kv, compile=compile)
        out += _rows_of(r.tokens, r.lengths)
    return out, None


def ours_sd(ctx, draft, target, prompts, batch, n, gamma, kv="dynamic", compile=False):
    from distillspec.evaluation import concat_results
    from distillspec.sd.engine import SpeculativeDecoder

    dec = SpeculativeDecoder(draft, target, gamma=gamma, temperature=0.0, eos_token_id=None, pad_token_id=0,
                             kv=kv, compile=compile)
    out, results = [], []
    for ids, mask in batches(ctx, prompts, batch):
        r = dec.generate(ids, mask, n)
        results.append(r)
        out += _rows_of(r.tokens, r.lengths)
    return out, concat_results(results)


def hf_generate(ctx, target, prompts, batch, n, assistant=None, gamma=5):
    """HF `generate` greedy, no EOS; with `assistant`: assisted generation (batch must be 1)."""
    kw = {}
    if assistant is not None:
        gc = assistant.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = gamma, "constant"
        gc.assistant_confidence_threshold = 0.0  # draft exactly gamma tokens per block
        kw["assistant_model"] = assistant
    out = []
    with torch.no_grad():
        for ids, mask in batches(ctx, prompts, batch):
            seq = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                  eos_token_id=None, pad_token_id=0, **kw)
            out += seq[:, ids.shape[1]:].tolist()
    return out, None


@torch.no_grad()
def call_costs(ctx, draft, target, prompts, batch, gamma, repeats, kv="dynamic", compile=False):
    """Median seconds of one draft forward, one target step and one target verify on a prefilled cache."""
    from distillspec.sd.static_cache import make_kv

    ids, mask = next(batches(ctx, prompts[:batch], batch))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = {}
    warm = 3 if compile else 1  # CUDA graph trees: a warm-up run, the recording, then replays
    for name, model, width in (("draft forward", draft, 1), ("target step", target, 1),
                               (f"target verify ({gamma + 1} pos.)", target, gamma + 1)):
        cache = make_kv(model, ids.shape[0], ctx.device, kv=kv, compile=compile, capacity=ids.shape[1] + width + 8,
                        role=f"cost{width}")
        cache.forward(ids, mask, pos, logits_to_keep=1)
        base, nxt = cache.width, pos[:, -1:] + 1
        toks = ids[:, -width:]
        times = []
        for _ in range(repeats + warm):
            before = cache.forward_time
            cache.forward(toks, torch.ones_like(toks), nxt + torch.arange(width, device=ctx.device),
                          logits_to_keep=width)
            times.append(cache.forward_time - before)
            cache.crop(base)
        out[name] = statistics.median(times[warm:])
        del cache
    return out


def run(ctx: Ctx, guard: TimeGuard, *, pair: str = "qwen3", batch_sizes=(1, 16), prompt_len: int = 128,
        new_tokens: int = 128, gamma: int = 5, b1_prompts: int = 2, hf: bool = True, repeats: int = 10) -> dict:
    """The speed table of one pair; returns {"rows", "costs", "goals", "skipped"} (plain values for JSON)."""
    small_shape, big_shape = PAIRS[pair]
    target = build(ctx, big_shape, seed=1, tie_word_embeddings=False)
    small = build(ctx, small_shape, seed=2, tie_word_embeddings=False)
    for m in (target, small):
        force_token_map(m)
        m.generation_config.eos_token_id = None
    vocab = target.config.vocab_size
    prompts = ragged_prompts(max(batch_sizes + (b1_prompts,)), prompt_len, vocab, ctx.seed)
    n, rows, skipped, tps = new_tokens, [], [], {}
    warm = min(8, n)

    def ours(sfx, name, kv, comp):  # our three rows on one cache path
        sd = f"SD ours, {name}," if name else "SD ours,"
        return [(f"target-only, ours ({name or 'KV cache'})", "target" + sfx,
                 lambda ps, b, k: ours_target(ctx, target, ps, b, k, kv, comp)),
                (f"{sd} all accepted (draft = target)", "sd_all" + sfx,
                 lambda ps, b, k: ours_sd(ctx, target, target, ps, b, k, gamma, kv, comp)),
                (f"{sd} none accepted (draft = small)", "sd_none" + sfx,
                 lambda ps, b, k: ours_sd(ctx, small, target, ps, b, k, gamma, kv, comp))]

    dyn = ours(*PATHS[0])
    methods = [
        dyn[0],
        ("target-only, HF generate", "hf_target", lambda ps, b, k: hf_generate(ctx, target, ps, b, k)),
        *dyn[1:],
        ("HF assisted, all accepted (B=1 only)", "hf_all", lambda ps, b, k: hf_generate(ctx, target, ps, 1, k, target, gamma)),
        ("HF assisted, none accepted (B=1 only)", "hf_none", lambda ps, b, k: hf_generate(ctx, target, ps, 1, k, small, gamma)),
    ]
    for path in PATHS[1:]:
        if path[3] and ctx.device.type != "cuda":  # compile=True needs CUDA: no such rows on CPU
            continue
        methods += ours(*path)
    for b in batch_sizes:
        ps = prompts[:b1_prompts] if b == 1 else prompts[:b]
        ref = None
        for label, key, fn in methods:
            if (not hf and key.startswith("hf")) or (key in ("hf_all", "hf_none") and b != 1):
                continue
            if guard.left() <= 0:
                skipped.append(f"{key} B={b}")
                continue
            # warm-up through the same code path and batch shapes: short, or (CUDA graphs) the full length so
            # that the timed run reuses the compiled graphs and the preallocated cache of the same capacity
            fn(ps, b, n if key.endswith("_graph") else warm)
            (outs, sd), secs = timed(ctx, fn, ps, b, n)
            tokens = sum(len(o) for o in outs)
            row = {"method": label, "key": key, "B": b, "prompts": len(ps), "tokens": tokens, "seconds": secs,
                   "tokens_per_s": tokens / secs}
            if key == "target":
                ref = row
                row["same_as_target"] = f"{len(outs)}/{len(outs)} (ref)"
                ref_outs = outs
            else:
                row["speedup_vs_target"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
                row["same_as_target"] = f"{sum(x == y for x, y in zip(outs, ref_outs))}/{len(outs)}" if ref else ""
            if sd is not None:
                acc, drafted = float(sd.num_accepted.sum()), float(sd.num_drafted.sum())
                row["alpha"] = acc / drafted
                row["tau"] = float(sd.lengths.sum()) / float(sd.num_blocks.sum())
                row["bookkeeping"] = max(0.0, 1 - (sd.time_draft + sd.time_target + sd.time_prefill) / sd.time_total)
            rows.append(row)
            tps[(key, b)] = row["tokens_per_s"]
    costs = []
    for b in batch_sizes:
        for sfx, name, kv, comp in PATHS:
            if comp and ctx.device.type != "cuda":
                continue
            if guard.left() <= 0:
                skipped.append(f"call costs{sfx} B={b}")
                continue
            c = call_costs(ctx, small, target, prompts, b, gamma, repeats, kv, comp)
            step = c["target step"]
            costs.append({"B": b, "cache": kv + (" + CUDA graphs" if comp else ""),
                          **{k + " ms": v * 1e3 for k, v in c.items()},
                          "c": c["draft forward"] / step, "verify ratio": c[f"target verify ({gamma + 1} pos.)"] / step})
    from distillspec.sd.static_cache import release_static_caches

    del target, small
    release_static_caches()  # pooled static caches and compiled graphs hold the models' memory
    release()
    big_b = max(batch_sizes)
    measured = {
        "b1_sd_vs_target": _ratio(tps, ("sd_all", 1), ("target", 1)),
        "b1_sd_vs_hf": _ratio(tps, ("sd_all", 1), ("hf_all", 1)),
        "bN_sd_vs_target": _ratio(tps, ("sd_all", big_b), ("target", big_b)),
        "c_b1": next((c["c"] for c in costs if c["B"] == 1 and c["cache"] == "dynamic"), None),
        "b1_static": _ratio(tps, ("sd_all_static", 1), ("target_static", 1)),
        "b1_graph": _ratio(tps, ("sd_all_graph", 1), ("target_graph", 1)),
        "b1_graph_vs_target": _ratio(tps, ("sd_all_graph", 1), ("target", 1)),
        "c_b1_graph": next((c["c"] for c in costs if c["B"] == 1 and c["cache"].endswith("graphs")), None),
    }
    goals = []
    for label, key, op, thr in GOALS:
        v = measured[key]
        ok = None if v is None else (v >= thr if op == ">=" else v <= thr)
        goals.append({"goal": label.replace("16", str(big_b)), "target": f"{op} {thr:g}", "measured": v,
                      "pass": {None: "not measured", True: "pass", False: "FAIL"}[ok]})
    return {"pair": pair, "shapes": [small_shape, big_shape], "rows": rows, "costs": costs, "goals": goals,
            "skipped": skipped, "settings": {"prompt_len": prompt_len, "new_tokens": n, "gamma": gamma,
                                             "batch_sizes": list(batch_sizes), "b1_prompts": b1_prompts}}


def _ratio(tps, a, b):
    return tps[a] / tps[b] if a in tps and b in tps else None
