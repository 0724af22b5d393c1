"""Student rollouts on vLLM (rollout.engine=vllm, rollout=student or the student part of mixed): a vLLM server
holding the student samples the on-policy completions, and its weights follow training.

How the weights get there: every `rollout.vllm_sync_every` optimizer steps (1: before every step's rollouts,
so the data is on-policy) the trainer writes the student with `save_pretrained` (safetensors) into
<run>/vllm_student/ and asks the server to reload them in place (vLLM's dev-mode `POST /collective_rpc
reload_weights`), then to drop its prefix cache (KV computed with the old weights). Reloading from saved files
rather than vLLM's NCCL weight-update API (TRL's `vllm_sync_frequency` path) because it works on every vLLM build
the project uses (the CPU build has no NCCL), across the process boundary (the serving env never shares a
process or a communicator with training), and with the server on another node given a shared filesystem; the
cost is one write and one read of the student per sync, measured by `make bench-rollout`.

The server starts at the first sync, from the weights of that moment (a resumed run's restored student), on
loopback from the serving env, and stops with the `with` block (end, error, Ctrl-C). Requests carry no seed
(vLLM 0.32's CPU engine dies on seeded chunk-prefilled requests: tools/vllm_seed_fault.py), so served
student rollouts are not a function of the run's seed the way our loop's are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError

log = logging.getLogger(__name__)

STUDENT_DIR = "vllm_student"  # under the run dir: the weights the server reloads
SERVER_LOG = Path("vllm_logs") / "student-server.log"


class StudentServer:
    """The student's vLLM server. `maybe_sync(step, student)` before each step's rollouts; `generate(...)` for
    the rollouts; `sync_seconds`: the time of each sync (save + reload), for the benchmark and the logs.

    Args: python: the serving env's interpreter. run_dir: the run's directory. tokenizer: the pair's (saved next
    to the weights: vLLM loads it from there). dtype: the served dtype. max_model_len: longest prompt +
    completion. sync_every: optimizer steps between syncs. args: extra `vllm serve` arguments. port: null = free.
    """

    def __init__(self, *, python: Path, run_dir: Path, tokenizer, dtype: str, max_model_len: int, sync_every: int,
                 prompt_lens: Sequence[int] = (), max_new_tokens: int = 0, seed: int = 0,
                 args: Sequence[str] = (), port: int | None = None) -> None:
        self.python, self.run_dir, self.tokenizer = Path(python), Path(run_dir), tokenizer
        self.dtype, self.max_model_len, self.sync_every = dtype, int(max_model_len), int(sync_every)
        self.prompt_lens, self.max_new_tokens, self.seed = list(prompt_lens), int(max_new_tokens), int(seed)
        self.args, self.port = [str(a) for a in args], port
        self.weights_dir = self.run_dir / STUDENT_DIR
        self.server = None
        self.client = None
        self.synced_step: int | None = None
        self.sync_seconds: list[float] = []

    # -- weights
    def _save(self, student) -> None:
        """The student as a model dir vLLM can load, written whole or not at all: the first save of a run
        writes config, tokenizer and weights into a temporary dir that then replaces <run>/vllm_student/
        (whatever an interrupted save left there); later saves replace the weights file (temporary name, then
        rename). ConfigError in one line naming the directory when it cannot be written (read-only, disk full).

        A student with tied input and output embeddings (SmolLM2, Qwen3-0.6B) is served untied, with its
        output head written as its own tensor: vLLM 0.32's in-place `reload_weights` reloads the embedding but
        leaves a tied head on the old weights (measured: the served greedy outputs then differ from the
        student's; tests/test_vllm_engine.py::test_served_student_follows_training). Untied, both are loaded
        from the file; the served model computes the same function."""
        state, untied = _served_state(student)
        try:
            if self.synced_step is None and self.client is None:  # a run's first save: the whole dir
                self._write_dir(student, state, untied)
            else:
                _save_weights(state, self.weights_dir)
        except OSError as exc:
            raise ConfigError(f"cannot write the student's weights for vLLM to {self.weights_dir} "
                              f"({type(exc).__name__}: {exc.strerror or exc}); free space or fix its "
                              "permissions, then rerun the same command") from None

    def _write_dir(self, student, state: dict, untied: bool) -> None:
        """Config, tokenizer and weights into <run>/.vllm_student.partial/, then renamed to weights_dir."""
        import shutil

        tmp, old = (self.run_dir / f".{STUDENT_DIR}.{what}" for what in ("partial", "old"))
        for d in (tmp, old):
            shutil.rmtree(d, ignore_errors=True)
        config = student.config.to_dict()
        if untied:
            config["tie_word_embeddings"] = False
        if not config.get("architectures"):  # a model built from a config has none; vLLM picks its class by it
            config["architectures"] = [type(student).__name__]
        try:
            tmp.mkdir(parents=True)
            type(student.config).from_dict(config).save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            _save_weights(state, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk keeps none of it
            raise
        if self.weights_dir.exists():
            self.weights_dir.rename(old)
        tmp.rename(self.weights_dir)
        shutil.rmtree(old, ignore_errors=True)

    def maybe_sync(self, step: int, student) -> bool:
        """Push `student`'s weights when `sync_every` steps have passed since the last push (or none was made).
        Returns whether it pushed."""
        if self.synced_step is not None and step - self.synced_step < self.sync_every:
            return False
        t0 = time.perf_counter()
        self._save(student)
        if self.client is None:
            self._start()
        else:
            self.client.reload_weights(self.weights_dir)
        self.synced_step = step
        self.sync_seconds.append(time.perf_counter() - t0)
        log.debug("student weights pushed to vLLM at step %d in %.2f s", step, self.sync_seconds[-1])
        return True

    def _start(self) -> None:
        from distillspec.serving.jobs import available_memory, kv_cache_bytes
        from distillspec.serving.server import ManagedServer

        args = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--seed", str(self.seed)]
        if not torch.cuda.is_available():
            args.append("--enforce-eager")
            kv = kv_cache_bytes(self.prompt_lens or [self.max_model_len // 2], self.max_new_tokens, 0,
                                self.max_model_len, [str(self.weights_dir)], available_memory())
            if kv is not None:
                args += ["--kv-cache-memory-bytes", str(kv)]
        self.server = ManagedServer(str(self.weights_dir), python=self.python, log=self.run_dir / SERVER_LOG,
                                    port=self.port, args=args + self.args, env={"VLLM_SERVER_DEV_MODE": "1"})
        self.client = self.server.start()
        log.info("vLLM %s serves the student on %s", self.client.version(), self.client.url)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = self.client = None

    # -- rollouts
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                 temperature: float, top_p: float, eos_ids: Sequence[int], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, L) left-padded prompts -> completions (B, T) right-padded with
        `pad_id` and their lengths (B,) (an EOS counts; T = the longest)."""
        if self.client is None:
            raise RuntimeError("StudentServer.generate before the first maybe_sync (no server yet)")
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        samples = self.client.sample(prompts, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                     stop_token_ids=list(eos_ids))
        lengths = torch.tensor([len(s.tokens) for s in samples], dtype=torch.long)
        comp = torch.full((len(samples), max(int(lengths.max()), 1)), pad_id, dtype=torch.long)
        for r, s in enumerate(samples):
            comp[r, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
        return comp, lengths


def _served_state(student) -> tuple[dict, bool]:
    """(state dict on the CPU with every tensor stored once, whether the output head was untied from the
    input embedding): what `StudentServer._save` writes."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
    head = _output_head_name(student)
    untied = bool(getattr(student.config, "tie_word_embeddings", False)) and head is not None
    if untied:
        state[head] = student.get_input_embeddings().weight.detach().to("cpu").clone()
    seen: dict[int, str] = {}
    for k in list(state):  # any other shared storage: safetensors stores each tensor once
        ptr = state[k].data_ptr()
        if ptr in seen:
            state[k] = state[k].clone()
        seen.setdefault(ptr, k)
    return state, untied


def _save_weights(state: dict, directory: Path) -> None:
    """`state` as directory/model.safetensors, whole or not at all (a temporary name, then a rename)."""
    from safetensors.torch import save_file

    tmp = directory / "model.safetensors.partial"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")


def _output_head_name(model) -> str | None:
    """The state-dict name of `model`'s output head weight (e.g. "lm_head.weight"), or None."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


@contextlib.contextmanager
def student_engine(spec, *, run_dir: Path, tokenizer, dtype: str, prompt_lens: Sequence[int], batch_prompts: int,
                   max_new_tokens: int, seed: int, world_size: int = 1, lora_rank: int = 0
                   ) -> Iterator[StudentServer | None]:
    """A StudentServer when rollout.engine=vllm draws student rollouts; else None. Stopped at the block's end."""
    from distillspec.rollout.engine import _max_model_len

    if spec.engine != C.ROLLOUT_ENGINE_VLLM or "student" not in spec.used_sources():
        yield None
        return
    if world_size > 1:
        raise ConfigError(f"student rollouts on vLLM (rollout.engine=vllm) with {world_size} training processes: "
                          "one student server per process is not supported yet; use rollout.engine=hf with "
                          "several processes, or one process")
    if lora_rank:
        raise ConfigError(f"student rollouts on vLLM with train.lora_rank={lora_rank}: the server reloads full "
                          "weights, and a LoRA student saves adapters only; use train.lora_rank=0 or "
                          "rollout.engine=hf")
    from distillspec.serving.env import serving_vllm_version
    from distillspec.serving.jobs import default_vllm_python

    python = Path(spec.vllm_python) if spec.vllm_python else default_vllm_python()
    serving_vllm_version(python)  # a missing serving env: one line saying `make vllm`, before any training
    longest = sorted(prompt_lens, reverse=True)[: max(batch_prompts, 1)]
    server = StudentServer(python=python, run_dir=run_dir, tokenizer=tokenizer, dtype=dtype,
                           max_model_len=_max_model_len(prompt_lens, max_new_tokens), sync_every=spec.vllm_sync_every,
                           prompt_lens=longest, max_new_tokens=max_new_tokens, seed=seed, args=spec.vllm_args)
    try:
        yield server
    finally:
        server.close()
        if server.sync_seconds:
            n, total = len(server.sync_seconds), sum(server.sync_seconds)
            log.info("student weight syncs: %d, %.2f s each on average", n, total / n)
