"""A vLLM server for teacher samples and teacher scores, reached over HTTP; vLLM is never imported here.

Two ways to get one (issue 27, "how vLLM starts"):
  * `ManagedServer`: starts `vllm serve` from the serving env (`.venv-vllm`, `make vllm`) on loopback, waits
    until it answers, and stops it when the `with` block ends: normally, on an error, on Ctrl-C. The engine runs
    in its own process group, which is terminated (SIGTERM, then SIGKILL) as a whole; on Linux the server also
    gets SIGTERM when the process that started it dies (PR_SET_PDEATHSIG), so `kill -9` of a training run
    leaves no engine behind. Its log is a file the caller names (kept under the run dir), so an error can
    point at it after the fact.
  * `EngineClient(url)`: any OpenAI-compatible vLLM server, e.g. one the user started on other GPUs or nodes
    (`rollout.vllm_url=http://host:port`). A URL that does not answer is an error within seconds.

The client speaks vLLM's completions API with token ids in and out (`return_tokens_as_token_ids`), so no text
round trip can change a token: `score` gives the teacher's top-k log-probs of given sequences
(`prompt_logprobs`, TRL's teacher-server request); `sample` gives sampled continuations with the top-k
log-probs of each sampled position. vLLM's prompt log-probs are always the raw model's (temperature 1:
`logprobs_mode` does not apply to prompt tokens), which is why a served teacher supports loss temperature 1 only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from distillspec.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0       # a server that does not answer /health within this is an error, not a hang
DYING_GRACE_S = 3.0           # after a refused or dropped request, how long a managed server may take to exit
READY_TIMEOUT_S = 900.0       # model load on a CPU takes ~20-60 s; a large model on a GPU minutes
TOKEN_ID_PREFIX = "token_id:"  # how vLLM names tokens with return_tokens_as_token_ids


def check_port_free(port: int, host: str = LOOPBACK) -> None:
    """ConfigError unless `port` can be bound on `host` (vLLM's own error would come after a model load)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use; pass rollout.vllm_port=<a free port>, "
                                  "or leave it unset (null) to take a free one") from None
            raise ConfigError(f"cannot bind port {port} on {host}: {exc.strerror or exc}") from None


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """In the child: SIGTERM when the parent dies (Linux; elsewhere the `with` block's stop is all there is)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class EngineClient:
    """HTTP client of one vLLM OpenAI-compatible server at `url` (http://host:port). Standard library only."""

    def __init__(self, url: str, *, timeout: float = 600.0, log: Path | None = None,
                 alive: Any = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.log = log          # the server's log, named in errors (managed servers)
        self._alive = alive     # callable raising EngineError when a managed server has died
        self._card: dict[str, Any] | None = None  # the served model's card, asked once (model())
        self.close = lambda: None  # a managed server's stop (ManagedServer sets it): done with the engine

    # -- transport
    def _request(self, path: str, body: dict | None = None, *, timeout: float | None = None) -> Any:
        if self._alive is not None:
            self._alive()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise EngineError(f"vLLM server {self.url}{path} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            if self._alive is not None:
                # a dead managed server says so, with its log; a dying one closes its sockets before the
                # process is gone, so give it a moment to finish exiting
                self._alive(DYING_GRACE_S)
            reason = getattr(exc, "reason", exc)
            where = f"; its log: {self.log}" if self.log else ""
            raise EngineError(f"vLLM server {self.url} did not answer {path} ({reason}){where}") from None
        return json.loads(raw) if raw.strip() else None

    def ping(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """EngineError unless GET /health answers within `timeout` seconds."""
        self._request("/health", timeout=timeout)

    def model(self) -> dict[str, Any]:
        """The served model's card: {"id": served name, "root": path or id it loaded, "max_model_len": n}."""
        if self._card is None:
            data = self._request("/v1/models", timeout=CONNECT_TIMEOUT_S * 6)["data"]
            if len(data) != 1:
                raise EngineError(f"vLLM server {self.url} serves {len(data)} models; expected exactly one")
            self._card = data[0]
        return self._card

    def version(self) -> str:
        """The server's vLLM version (GET /version)."""
        return str(self._request("/version", timeout=CONNECT_TIMEOUT_S * 6)["version"])

    def tokenize(self, text: str) -> list[int]:
        """The server's tokenizer on `text`, special tokens not added."""
        out = self._request("/tokenize", {"model": self.model()["id"], "prompt": text, "add_special_tokens": False})
        return [int(t) for t in out["tokens"]]

    # -- teacher scores and samples
    def score(self, sequences: Sequence[Sequence[int]], top_k: int) -> list[list[dict[int, float] | None]]:
        """The served model's log-probs (temperature 1) over each sequence: for sequence s, entry t (t >= 1) is
        {token id: log p(token | s[:t])} for the top-`top_k` tokens and s[t] itself; entry 0 is None.
        One request for all sequences (a list of token-id prompts; vLLM batches them)."""
        if not sequences:
            return []
        body = {"model": self.model()["id"], "prompt": [[int(t) for t in seq] for seq in sequences],
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": int(top_k), "add_special_tokens": False}
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise EngineError(f"vLLM answered {len(choices)} choices for {len(sequences)} scored sequences")
        return [[None if d is None else {int(k): float(v["logprob"]) for k, v in d.items()}
                 for d in c["prompt_logprobs"]] for c in choices]

    def reload_weights(self, weights_dir: str | Path) -> None:
        """The served model's weights reloaded in place from the safetensors in `weights_dir` (vLLM's dev-mode
        POST /collective_rpc reload_weights; the server needs VLLM_SERVER_DEV_MODE=1), then its prefix cache
        dropped (cached KV of the old weights must not be reused)."""
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(weights_dir)}}
        try:
            self._request("/collective_rpc", body, timeout=max(self.timeout, 600.0))
            for _ in range(20):  # it refuses while blocks are held (running requests): none run between steps
                answer = self._request("/reset_prefix_cache", {})
                if not isinstance(answer, dict) or answer.get("success", True):
                    break
                time.sleep(0.25)
            else:
                raise EngineError(f"vLLM server {self.url} did not drop its prefix cache after a weight reload "
                                  "(KV of the old weights would be reused); its log: " + str(self.log))
        except EngineError as exc:
            if "HTTP 404" in str(exc):
                raise EngineError(f"vLLM server {self.url} has no /collective_rpc: start it with "
                                  "VLLM_SERVER_DEV_MODE=1 to let the trainer push the student's weights") from None
            raise

    def sample(self, prompts: Sequence[Sequence[int]], *, temperature: float, top_p: float, max_tokens: int,
               top_k_logprobs: int = 0, stop_token_ids: Sequence[int] = (), seed: int | None = None,
               ) -> list["Sample"]:
        """One sampled continuation per prompt (token ids) and, when `top_k_logprobs`, the top-k log-probs of
        each sampled position as vLLM returns them (its `logprobs_mode`)."""
        name = self.model()["id"]
        body: dict[str, Any] = {"model": name, "prompt": [[int(t) for t in p] for p in prompts],
                                "max_tokens": int(max_tokens), "temperature": float(temperature),
                                "top_p": float(top_p), "stop_token_ids": [int(t) for t in stop_token_ids],
                                "return_tokens_as_token_ids": True, "return_token_ids": True, "add_special_tokens": False,
                                "skip_special_tokens": False}
        if top_k_logprobs:
            body["logprobs"] = int(top_k_logprobs)
        if seed is not None:
            body["seed"] = int(seed)
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [Sample.from_choice(c) for c in choices]


@dataclass
class Sample:
    """One sampled continuation: `tokens` (ids) and, per position, {token id: log-prob} (empty without
    log-probs requested); `finish_reason` is vLLM's ("stop": EOS or a stop id, "length": the token cap)."""

    tokens: list[int]
    top_logprobs: list[dict[int, float]]
    finish_reason: str | None

    @staticmethod
    def from_choice(choice: dict[str, Any]) -> "Sample":
        lp = choice.get("logprobs") or {}
        named = [_token_id(t) for t in lp.get("tokens") or []]
        tokens = [int(t) for t in choice["token_ids"]] if choice.get("token_ids") is not None else named
        if named and named != tokens:
            raise EngineError(f"vLLM's token_ids {tokens[:8]}... and its log-prob tokens {named[:8]}... differ")
        tops = [{_token_id(k): float(v) for k, v in (d or {}).items()} for d in lp.get("top_logprobs") or []]
        return Sample(tokens=tokens, top_logprobs=tops, finish_reason=choice.get("finish_reason"))


def _token_id(name: str) -> int:
    if not name.startswith(TOKEN_ID_PREFIX):
        raise EngineError(f"vLLM returned token {name!r} without its id (expected {TOKEN_ID_PREFIX}<n>)")
    return int(name[len(TOKEN_ID_PREFIX):])


class ManagedServer(contextlib.AbstractContextManager):
    """`vllm serve MODEL` from the serving env on loopback, for the length of a `with` block.

    `python`: the serving env's interpreter (its sibling `vllm` is the command); `log`: the server's log file;
    `args`: extra `vllm serve` arguments (e.g. ["--dtype", "float32", "--max-logprobs", "64"]).
    """

    def __init__(self, model: str, *, python: Path, log: Path, port: int | None = None,
                 args: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT_S, env: dict | None = None) -> None:
        self.python, self.model, self.log = Path(python), model, Path(log)
        self.port = port
        self.args, self.ready_timeout, self.extra_env = list(args), ready_timeout, dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.client: EngineClient | None = None
        self.argv: list[str] = []  # the command started (its port chosen)

    def command(self, port: int) -> list[str]:
        return [str(self.python.parent / "vllm"), "serve", self.model, "--host", LOOPBACK, "--port", str(port),
                *self.args]

    def start(self) -> EngineClient:
        from distillspec.serving.env import check_serving_python

        check_serving_python(self.python)
        if self.port is not None:
            check_port_free(self.port)
        port = self.port if self.port is not None else free_port()
        self.argv = self.command(port)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        from distillspec.serving.env import server_env

        env = server_env(os.environ, self.extra_env)
        if "--kv-cache-memory-bytes" not in self.args:  # unset on a CPU, vLLM wants 92 % of the machine's memory
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.client = EngineClient(f"http://{LOOPBACK}:{port}", log=self.log, alive=self.check_alive)
        self.client.close = self.stop
        self._wait_ready()
        return self.client

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            self.check_alive()
            try:
                self.client.ping(timeout=2.0)
                return
            except EngineError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineError(f"vLLM server for {self.model} was not ready after {self.ready_timeout:.0f} s;"
                                      f" stopped it; its log: {self.log}") from None
                time.sleep(0.5)

    def check_alive(self, grace: float = 0.0) -> None:
        """EngineError naming the log when the server process has exited (or exits within `grace` s)."""
        if self.proc is not None and grace > 0:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            raise EngineError(f"the vLLM server for {self.model} exited (code {code}); its log: {self.log}"
                              f" (last lines: {_tail(self.log)})")

    def stop(self, grace: float = 15.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after `grace` s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.info("stopped the vLLM server for %s (pid %d; log %s)", self.model, proc.pid, self.log)

    def __enter__(self) -> EngineClient:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def connect(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> EngineClient:
    """A client of the server at `url` that answered /health within `timeout` s; ConfigError otherwise."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"rollout.vllm_url={url!r} is not an http(s) URL; valid: http://host:port")
    client = EngineClient(url)
    try:
        client.ping(timeout=timeout)
    except EngineError as exc:
        raise ConfigError(f"rollout.vllm_url={url!r}: no vLLM server answered within {timeout:g} s ({exc}); "
                          "start one (docs/serving.md) or leave rollout.vllm_url unset to start one here") from None
    return client
