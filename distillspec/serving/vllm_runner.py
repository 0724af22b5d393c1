"""One vLLM offline generation with its speculative-decoding counters, run in the serving environment.

    python -m distillspec.serving.vllm_runner JOB.json OUT.json

Imports vLLM and the standard library only (the serving venv pins its own transformers). JOB.json:
  target, draft (dir or null: target-only), gamma, draft_sample_method (null: vLLM's default),
  prompts (list of token-id lists: the same encoded prompts our engine decodes), temperature, top_p,
  max_tokens, seed (request i uses seed + i; null: unseeded), stop_token_ids, max_model_len, dtype,
  warmup_tokens (an untimed generation first; its counters are subtracted), patch_cpu_expand (true: run the
  engine in-process and replace vLLM's CPU `expand_batch_to_tokens`: `patch_expand`),
  kv_cache_memory_bytes (the KV space, sized by the check; null: vLLM's default; $VLLM_CPU_KVCACHE_SPACE,
  when set, overrides it on the CPU build).
OUT.json: outputs (token ids per prompt, EOS included when produced), finish_reasons, counters (deltas of
  vllm:spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens and the per-position vector over
  the timed generation), per_request (with a draft: each request's vLLM spec-decode metrics, `acceptance_
  histogram` [drafts accepting j tokens, j = 0..gamma] and `num_draft_tokens`), load_s, generate_s,
  num_output_tokens, vllm_version, speculative_config.
"""

from __future__ import annotations

import json
import os
import sys
import time

COUNTERS = {"num_drafts": "vllm:spec_decode_num_drafts", "num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
            "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_counters(llm) -> dict:
    """vLLM's spec-decode counters now (zeros and [] when the engine runs no speculation)."""
    by_name = {m.name: m for m in llm.get_metrics()}
    out = {key: int(getattr(by_name[name], "value", 0)) if name in by_name else 0 for key, name in COUNTERS.items()}
    out["num_accepted_tokens_per_pos"] = [int(v) for v in getattr(by_name.get(PER_POS), "values", None) or []]
    return out


def _delta(after: dict, before: dict) -> dict:
    out = {k: after[k] - before[k] for k in COUNTERS}
    a, b = after["num_accepted_tokens_per_pos"], before["num_accepted_tokens_per_pos"]
    b = b + [0] * (len(a) - len(b))
    out["num_accepted_tokens_per_pos"] = [x - y for x, y in zip(a, b)]
    return out


def _request_metrics(completion) -> dict | None:
    """{acceptance_histogram, num_draft_tokens} of one finished request (None where vLLM gave none)."""
    m = getattr(completion, "spec_decode_metrics", None)
    if m is None:
        return None
    d = m.to_dict()
    return {"acceptance_histogram": [int(x) for x in d["acceptance_histogram"]],
            "num_draft_tokens": int(d["num_draft_tokens"])}


def patch_expand() -> None:
    """Replace vLLM's `expand_batch_to_tokens` with a dtype-preserving torch version, engine in-process.

    vLLM 0.32's CPU build swaps the Triton kernel behind it for a C++ one whose wrapper writes into a dropped
    int64 copy of the output, so the rejection sampler's per-token temperatures, top-k and top-p are
    uninitialised memory at T > 0 (reproduction: tools/vllm_cpu_fault.py; docs/vllm-cpu-faults.md)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm.v1.sample.rejection_sampler as rs

    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
        y = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return y.repeat_interleave(counts, output_size=num_tokens)

    rs.expand_batch_to_tokens = expand_batch_to_tokens


def run(job: dict) -> dict:
    if job.get("patch_cpu_expand"):
        patch_expand()
    from vllm import LLM, SamplingParams
    import vllm

    spec = None
    if job.get("draft"):
        spec = {"method": "draft_model", "model": job["draft"], "num_speculative_tokens": int(job["gamma"])}
        if job.get("draft_sample_method"):
            spec["draft_sample_method"] = job["draft_sample_method"]
    extra = {}
    if spec is not None:  # per-request counters (vLLM >= 0.32): the check's confidence intervals
        extra["per_request_spec_decode_metrics"] = "summary"
    if job.get("kv_cache_memory_bytes"):
        extra["kv_cache_memory_bytes"] = int(job["kv_cache_memory_bytes"])
    t0 = time.perf_counter()
    llm = LLM(model=job["target"], tokenizer=job["target"], dtype=job.get("dtype", "float32"),
              max_model_len=int(job.get("max_model_len", 1024)), enforce_eager=True, disable_log_stats=False,
              seed=int(job.get("seed") or 0), speculative_config=spec, **extra)
    load_s = time.perf_counter() - t0

    def params(i: int, max_tokens: int):
        seed = job.get("seed")
        return SamplingParams(temperature=float(job["temperature"]), top_p=float(job.get("top_p", 1.0)),
                              max_tokens=max_tokens, seed=None if seed is None else int(seed) + i,
                              stop_token_ids=list(job.get("stop_token_ids") or []), detokenize=False)

    prompts = [{"prompt_token_ids": list(p)} for p in job["prompts"]]
    if job.get("warmup_tokens"):
        llm.generate(prompts[:1], [params(0, int(job["warmup_tokens"]))], use_tqdm=False)
    before = read_counters(llm)
    t1 = time.perf_counter()
    results = llm.generate(prompts, [params(i, int(job["max_tokens"])) for i in range(len(prompts))], use_tqdm=False)
    generate_s = time.perf_counter() - t1
    outputs = [list(r.outputs[0].token_ids) for r in results]
    per_request = [_request_metrics(r.outputs[0]) for r in results] if spec is not None else None
    return {"outputs": outputs, "per_request": per_request, "finish_reasons": [r.outputs[0].finish_reason for r in results],
            "counters": _delta(read_counters(llm), before), "load_s": load_s, "generate_s": generate_s,
            "num_output_tokens": sum(map(len, outputs)), "vllm_version": vllm.__version__,
            "speculative_config": spec, "patched_cpu_expand": bool(job.get("patch_cpu_expand"))}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    out = run(job)
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":  # vLLM may start engine processes with spawn: keep the guard
    sys.exit(main(sys.argv[1:]))
