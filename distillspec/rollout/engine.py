"""The engine that makes the teacher's training data: `hf` (our decoding loop, in this process) or `vllm`
(a vLLM server over HTTP: `distillspec.serving`).

`rollout_engine(...)` is a context manager that yields None for `hf`, or for `vllm` a client of:
  * the server at `rollout.vllm_url`, which must answer within seconds (the user started it, e.g. on other
    GPUs or nodes under tensor parallelism: docs/serving.md) and give as many log-probs per token as the run
    asks for (its --max-logprobs);
  * else a server this run starts from the serving env (`.venv-vllm`) on loopback at the first request that
    needs it (a run whose teacher data is stored starts none) and stops at the end, on an error and on Ctrl-C
    (its log: <run>/vllm_logs/teacher-server.log).
Either way the served model is checked against the configured target before it makes any teacher data
(`verify_served_teacher`, passed in as `verify`): the same tokenizer on a probe text, and the same log-probs on
a probe sequence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.rollout.target_probe import ServedTarget

log = logging.getLogger(__name__)

SERVER_LOG = Path("vllm_logs") / "teacher-server.log"
PROBE_TEXT = "Natalia sold clips to 48 of her friends in April, and then half as many in May."
# Mean |Δ log p| of the probe's tokens above which the served model is not the configured one. A bf16 server
# against our float32 forward differs by ~1e-2; another model (a draft, other weights) by far more than 1.
MAX_PROBE_DIFF = 0.1


def _max_model_len(prompt_lens: Sequence[int], max_new_tokens: int, block: int = 256) -> int:
    return int(math.ceil((max(prompt_lens) + max_new_tokens + 1) / block) * block)


def check_max_logprobs(client, top_k: int) -> None:
    """ConfigError in one line unless the server gives `top_k` log-probs per token (a server started without
    --max-logprobs gives vLLM's default, 20): one prompt_logprobs request on a few probe tokens."""
    client.score([client.tokenize(PROBE_TEXT)[:4]], top_k=top_k)


@contextlib.contextmanager
def rollout_engine(spec, *, target: str, dtype: str, run_dir: Path, prompt_lens: Sequence[int],
                   max_new_tokens: int, seed: int, world_size: int = 1,
                   verify: Callable[[object], object] | None = None) -> Iterator[object | None]:
    """None for rollout.engine=hf, or when no teacher log-probs are served (vllm with rollout=student and the
    teacher in process: only the student is served, distillspec.rollout.student_server); else a client of the
    teacher's server (see the module docstring). `verify(client)`: the check that the server serves the
    configured target, run before the server makes any teacher data."""
    if spec.engine != C.ROLLOUT_ENGINE_VLLM or not spec.serves_teacher_logprobs():
        yield None
        return
    if spec.vllm_url:
        from distillspec.serving.client import connect

        client = connect(spec.vllm_url)
        check_max_logprobs(client, max(spec.cache_top_k, 1))
        log.info("teacher data from the vLLM server at %s (vLLM %s, model %s)", spec.vllm_url, client.version(),
                 client.model()["id"])
        if verify is not None:
            verify(client)
        yield client
        return
    if world_size > 1:
        raise ConfigError(f"rollout.engine=vllm with {world_size} processes: each would start its own teacher "
                          "server; start one (docs/serving.md) and pass rollout.vllm_url=http://host:port")
    from distillspec.serving.env import serving_vllm_version
    from distillspec.serving.jobs import default_vllm_python
    from distillspec.serving.server import LazyClient, check_port_free

    python = Path(spec.vllm_python) if spec.vllm_python else default_vllm_python()
    version = serving_vllm_version(python)  # a python without vLLM: one line, before any work
    if spec.vllm_port is not None:
        check_port_free(spec.vllm_port)  # refused now, not when the server starts
    server = teacher_server(spec, python, target=target, dtype=dtype, run_dir=run_dir, prompt_lens=prompt_lens,
                            max_new_tokens=max_new_tokens, seed=seed)

    def started(client) -> None:
        log.info("vLLM %s serves the teacher on %s: %s", version, client.url, " ".join(server.argv))
        if verify is not None:
            verify(client)

    client = LazyClient(server, version=version, on_start=started)
    try:
        yield client
    finally:
        client.close()
    if not client.needed:
        log.info("the vLLM teacher server was not started: this run asked it for nothing (stored teacher data)")


def teacher_server(spec, python: Path, *, target: str, dtype: str, run_dir: Path, prompt_lens: Sequence[int],
                   max_new_tokens: int, seed: int):
    """The ManagedServer (not started) of the configured target, sized for the run's prompts and its log-probs."""
    from distillspec.models.loading import resolve_model_path
    from distillspec.serving.jobs import available_memory, kv_cache_bytes
    from distillspec.serving.server import ManagedServer

    target_dir = resolve_model_path(target)
    max_len = _max_model_len(prompt_lens, max_new_tokens)
    args = ["--dtype", dtype, "--max-model-len", str(max_len), "--max-logprobs", str(max(spec.cache_top_k, 1)),
            "--seed", str(seed)]
    if not torch.cuda.is_available():
        args.append("--enforce-eager")  # no CUDA graphs to capture: skip the compile step
        kv = kv_cache_bytes(list(prompt_lens), max_new_tokens, 0, max_len, [target_dir], available_memory())
        if kv is not None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args += ["--kv-cache-memory-bytes", str(kv)]
    args += [str(a) for a in spec.vllm_args or ()]
    return ManagedServer(target_dir, python=python, log=run_dir / SERVER_LOG, port=spec.vllm_port, args=args)


@torch.no_grad()
def verify_served_teacher(client, teacher, tokenizer, probe_ids: Sequence[int], target_name: str) -> float:
    """ConfigError unless the served model is the configured target: the same tokens for PROBE_TEXT, and
    log-probs of `probe_ids` (a training prompt) within MAX_PROBE_DIFF (mean |Δ log p|) of `teacher`'s.
    `teacher`: the target model, or (rollout.teacher_location=server) a ServedTarget whose probe log-probs a
    child process computed on `probe_ids` (distillspec.rollout.target_probe). Returns that mean difference."""
    card = client.model()
    served, ours = client.tokenize(PROBE_TEXT), tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if served != list(ours):
        raise ConfigError(f"the vLLM server at {client.url} serves {card['id']!r}, whose tokenizer is not the "
                          f"configured target's ({target_name!r}): {PROBE_TEXT!r} -> {served[:8]}... there, "
                          f"{list(ours)[:8]}... here; serve the configured target, or set pair.target to the served "
                          "model")
    seq = [int(t) for t in probe_ids]
    rows = client.score([seq], top_k=1)[0]
    if isinstance(teacher, ServedTarget):  # teacher_location=server: measured in a child process, not loaded here
        if teacher.probe_ids != seq:
            raise ValueError("the target was measured on another probe sequence than the one verified")
        mine = torch.tensor(teacher.probe_logprobs)
    else:
        device = next(teacher.parameters()).device
        lp = torch.log_softmax(teacher(torch.tensor([seq], device=device)).logits[0, :-1].float(), -1)
        mine = lp.gather(-1, torch.tensor(seq[1:], device=device)[:, None])[:, 0].cpu()
    theirs = torch.tensor([row[t] for row, t in zip(rows[1:], seq[1:])])
    diff = float((mine - theirs).abs().mean())
    if not diff <= MAX_PROBE_DIFF:
        raise ConfigError(f"the vLLM server at {client.url} serves {card['id']!r}, whose log-probs differ from the "
                          f"configured target {target_name!r} (mean |Δ log p| {diff:.3g} over {len(seq) - 1} probe "
                          f"tokens; the same model gives < {MAX_PROBE_DIFF}): other weights. Serve the configured "
                          "target, or set pair.target to the served model")
    log.info("the served teacher %r matches %r (probe: mean |Δ log p| %.2g)", card["id"], target_name, diff)
    return diff
