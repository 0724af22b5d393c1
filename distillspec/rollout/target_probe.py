"""The configured target, described without loading it in this process (rollout.teacher_location=server).

With the teacher served (a vLLM teacher server scores every training sequence), the training process never holds
the target's weights. What it still needs from them is small and is computed once, in a short-lived child process
(`sys.executable -m distillspec.rollout.target_probe`) that loads the target as `distillspec.models.loading` loads
it (same dtype, quantization and device as an in-process teacher would have), answers in a JSON file and exits,
so its memory is returned before training starts:

  * its log-probs of a probe sequence (the first training prompt), which `distillspec.rollout.engine.
    verify_served_teacher` compares with the served model's (the same check as with an in-process teacher);
  * its weights' fingerprint (`cache_store.model_fingerprint`), which keys the stored teacher data as an
    in-process teacher's would;
  * its logits dimension and its generation config's EOS ids.

`ServedTarget` holds these answers; it stands where the teacher model would (`ModelPair.target`,
`RolloutSampler.teacher`), and is not a model: nothing can run it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from distillspec.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3600.0  # a large target loads in minutes


@dataclass
class ServedTarget:
    """The configured target as measured by a child process (see the module docstring).

    name: pair.target; fingerprint: cache_store.model_fingerprint of its weights; logits_dim: its output
    vocabulary size; eos_ids: its generation config's EOS ids; probe_ids (L,) and probe_logprobs (L - 1,):
    log p(probe_ids[t] | probe_ids[:t]) for t >= 1, from its forward in float32 log-softmax."""

    name: str
    fingerprint: str
    logits_dim: int
    eos_ids: list[int]
    probe_ids: list[int]
    probe_logprobs: list[float]
    generation_config: SimpleNamespace = field(init=False, repr=False)

    def __post_init__(self) -> None:  # what evaluation.eos_token_ids reads off a model
        self.generation_config = SimpleNamespace(eos_token_id=list(self.eos_ids))


def describe_target(name: str, *, dtype: str, quantization: str | None, device: str, probe_ids: Sequence[int],
                    timeout: float = PROBE_TIMEOUT_S) -> ServedTarget:
    """Load target `name` in a child process on `device` (dtype, quantization: as an in-process teacher) and
    return its ServedTarget; the child's memory is gone when this returns. ConfigError naming the target, with
    the child's last output lines, when it fails."""
    with tempfile.TemporaryDirectory(prefix="distillspec-target-probe-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({"name": name, "dtype": dtype, "quantization": quantization,
                                       "device": str(device), "probe_ids": [int(t) for t in probe_ids]}))
        argv = [sys.executable, "-m", "distillspec.rollout.target_probe", str(request), str(answer)]
        log.info("measuring the target %r in a child process (pid below), not in this one", name)
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            raise ConfigError(f"loading the target {name!r} in a child process took over {timeout:.0f} s") from None
        if p.returncode != 0 or not answer.exists():
            tail = " | ".join([ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()][-5:])
            raise ConfigError(f"loading the target {name!r} in a child process failed (exit {p.returncode}): {tail}")
        out = json.loads(answer.read_text())
    log.info("target %r measured in child process %d and released (logits dim %d)", name, out.pop("pid"),
             out["logits_dim"])
    return ServedTarget(name=name, **out)


def weights_fingerprint(teacher) -> str:
    """The teacher-data store's key part for the teacher's weights: a model's checksum, or a ServedTarget's."""
    from distillspec.rollout.cache_store import model_fingerprint

    return teacher.fingerprint if isinstance(teacher, ServedTarget) else model_fingerprint(teacher)


def logits_dim(teacher) -> int:
    """The teacher's output vocabulary size (a model's output embedding rows, or a ServedTarget's)."""
    return teacher.logits_dim if isinstance(teacher, ServedTarget) else \
        int(teacher.get_output_embeddings().weight.shape[0])


def _measure(request: dict) -> dict:
    """In the child: load the target and answer what ServedTarget holds (and the child's pid)."""
    import torch

    from distillspec.models.loading import load_model
    from distillspec.rollout.cache_store import model_fingerprint

    model = load_model(request["name"], dtype=request["dtype"], quantization=request["quantization"],
                       device=request["device"], trainable=False)
    seq = [int(t) for t in request["probe_ids"]]
    dev = next(model.parameters()).device
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq], device=dev)).logits[0, :-1].float(), -1)
    picked = lp.gather(-1, torch.tensor(seq[1:], device=dev)[:, None])[:, 0].cpu().tolist()
    gen = getattr(model.generation_config, "eos_token_id", None)
    eos = [gen] if isinstance(gen, int) else list(gen or [])
    return {"fingerprint": model_fingerprint(model), "logits_dim": int(model.get_output_embeddings().weight.shape[0]),
            "eos_ids": [int(e) for e in eos], "probe_ids": seq, "probe_logprobs": picked, "pid": os.getpid()}


def main(argv: Sequence[str] | None = None) -> int:
    request_path, answer_path = (sys.argv[1:] if argv is None else list(argv))[:2]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    answer = _measure(json.loads(Path(request_path).read_text()))
    tmp = Path(answer_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(answer))
    tmp.replace(answer_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
