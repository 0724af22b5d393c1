"""Peak memory of the distillation loss (forward + backward), chunked vs unchunked, per divergence.

    python benchmarks/bench_loss_memory.py                          # B=1, T=312, V=151,936 (1-2 min, CPU)
    python benchmarks/bench_loss_memory.py --batch 2 --tokens 312   # twice the rows (~2-3 min on 2 cores)
    python benchmarks/bench_loss_memory.py --batch 16 --tokens 312  # the full setting (needs ~25+ GiB unchunked)
    python benchmarks/bench_loss_memory.py --chunk-sizes 64 256 1024 --divergences fkl rkl
    python benchmarks/bench_loss_memory.py --batch 16 --skip-unchunked --divergences fkl

What is measured. Student logits (requires_grad) and teacher logits of shape (B, T, V) in --dtype
(bfloat16 by default, as in training; V = 151,936 is the Qwen vocabulary) and an all-True mask (change
with --mask-frac) go through `divergence_loss(...)` and `loss.backward()` once, on CPU.

How. CPU has no torch.cuda.max_memory_allocated, and tracemalloc does not see torch's allocations, so
each configuration runs in its own fresh subprocess and reads the process's resident set size: after
importing torch, a small warm-up call of the same code path (thread pools, kernels) and allocating the
inputs in place (`empty().normal_()`, no temporaries), it records the current RSS from /proc/self/statm;
after forward + backward it reads the high-water mark `resource.getrusage(RUSAGE_SELF).ru_maxrss`.
The reported peak is the difference: the extra resident memory at the worst moment of the loss's
forward + backward, over the already-allocated inputs. It includes the gradient w.r.t. the student
logits (one (B, T, V) tensor in --dtype, listed separately as "grad" for reference) - any
implementation must allocate that. glibc serves blocks over 32 MiB with mmap and returns them on free,
so for the unchunked path RSS tracks torch's live tensors closely; smaller blocks (the chunked path's
per-chunk temporaries when C * V * 4 bytes < 32 MiB) are kept by the allocator after free, and that
retained memory is counted too, as it is memory the process really holds (like a GPU caching
allocator's reserve). Small-allocation noise is a few MiB.

Size. The default is one sequence of 312 tokens (B=1, T=312) so that the 12 subprocesses finish in
1-2 minutes on a 2-core CPU. Peak memory scales with B * T for the unchunked path; for the chunked
path only the grad does (the rest is O(C * V)), so --batch 16 --skip-unchunked shows the full setting
without the ~25 GiB unchunked run. A configuration that runs out of memory is reported as "failed".
Times are one forward + backward, wall clock, for orientation only: they are noisy on a shared machine,
and recompute makes the chunked backward do the forward work a second time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DIVERGENCE_NAMES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
MIB = 1024 ** 2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """Run one configuration and print a JSON line with the peak RSS increase and the time."""
    import torch

    from distillspec.losses.divergences import divergence_loss

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    chunk = None if args.chunk == 0 else args.chunk

    def make(b, t, v):
        s = torch.empty(b, t, v, dtype=dtype).normal_().requires_grad_(True)
        te = torch.empty(b, t, v, dtype=dtype).normal_()
        mask = torch.rand(b, t) < args.mask_frac
        return s, te, mask

    s, te, mask = make(1, 4, 64)  # warm-up on the same path
    divergence_loss(s, te, mask | True, args.name, chunk_size=chunk)[0].backward()
    del s, te, mask

    s, te, mask = make(args.batch, args.tokens, args.vocab)
    base = rss_bytes()
    t0 = time.perf_counter()
    loss, _ = divergence_loss(s, te, mask, args.name, chunk_size=chunk)
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert torch.isfinite(loss), loss
    print(json.dumps({"peak": peak - base, "seconds": elapsed, "rows": int(mask.sum())}))


def measure(args, name: str, chunk: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--name", name, "--chunk", str(chunk),
           "--batch", str(args.batch), "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--mask-frac", str(args.mask_frac)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{name}, chunk={chunk}] failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=312)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--mask-frac", type=float, default=1.0, help="fraction of positions in the loss mask")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64], help="rows per chunk (chunked path)")
    p.add_argument("--skip-unchunked", action="store_true",
                   help="only the chunked path (the unchunked one needs ~25 GiB at --batch 16 --tokens 312)")
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCE_NAMES), choices=DIVERGENCE_NAMES)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from tabulate import tabulate

    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    numel = args.batch * args.tokens * args.vocab
    print(f"B={args.batch} T={args.tokens} V={args.vocab:,} dtype={args.dtype} mask_frac={args.mask_frac}: "
          f"inputs (student + teacher logits) {2 * numel * itemsize / MIB:,.0f} MiB, "
          f"grad {numel * itemsize / MIB:,.0f} MiB, one float32 (B*T, V) tensor {numel * 4 / MIB:,.0f} MiB\n")
    chunks = ([] if args.skip_unchunked else [0]) + list(args.chunk_sizes)
    label = [f"chunk={c}" if c else "unchunked" for c in chunks]
    headers = ["divergence"] + [f"{lab} peak MiB" for lab in label] + [f"{lab} s" for lab in label]
    rows = []
    for name in args.divergences:
        res = [measure(args, name, c) for c in chunks]
        rows.append([name] + [f"{r['peak'] / MIB:,.0f}" if r else "failed" for r in res]
                    + [f"{r['seconds']:.2f}" if r else "-" for r in res])
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print("\npeak MiB = resident memory above the allocated inputs at the worst point of forward + backward "
          "(includes the grad).")


if __name__ == "__main__":
    main()
