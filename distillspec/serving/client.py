"""HTTP client of a vLLM OpenAI-compatible server; vLLM is never imported here. Standard library only.

`EngineClient` speaks vLLM's completions API with token ids in and out (`return_tokens_as_token_ids`), so no
text round trip can change a token: `score` gives the teacher's top-k log-probs of given sequences
(`prompt_logprobs`, TRL's teacher-server request); `sample` gives sampled continuations with the top-k
log-probs of each sampled position. vLLM's prompt log-probs are always the raw model's (temperature 1:
`logprobs_mode` does not apply to prompt tokens), which is why a served teacher supports loss temperature 1 only.

`connect(url)` reaches a server the user runs (`rollout.vllm_url=http://host:port`, e.g. on other GPUs or
nodes): a URL that does not answer, or answers but is not vLLM, is a one-line error within seconds. Failures are
typed: `NoAnswerError` (nothing answered), `ServerHTTPError` (an HTTP error status, with vLLM's message),
`BadAnswerError` (an answer vLLM would not give); all are EngineErrors.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from distillspec.errors import ConfigError, EngineError

CONNECT_TIMEOUT_S = 5.0       # a server that does not answer /health within this is an error, not a hang
DYING_GRACE_S = 3.0           # after a refused or dropped request, how long a managed server may take to exit
TOKEN_ID_PREFIX = "token_id:"  # how vLLM names tokens with return_tokens_as_token_ids
# vLLM's refusal of more log-probs than its --max-logprobs (default 20), for prompt and sample log-probs alike
TOO_MANY_LOGPROBS = re.compile(r"logprobs of (\d+), which is greater than max allowed: (\d+)")


class NoAnswerError(EngineError):
    """Nothing answered the request: connection refused or reset, or no answer within the timeout."""


class ServerHTTPError(EngineError):
    """The server answered with an HTTP error. `status`: its code; `detail`: its error message (vLLM's
    `error.message`, FastAPI's `detail`), empty when the body was not JSON (an HTML page is never quoted)."""

    def __init__(self, url: str, path: str, status: int, detail: str) -> None:
        self.path, self.status, self.detail = path, int(status), detail
        super().__init__(f"vLLM server {url}{path} answered HTTP {status}" + (f": {detail}" if detail else ""))


class BadAnswerError(EngineError):
    """The server answered, but not with what vLLM answers (a body that is not JSON, or lacks a field)."""


def _error_detail(body: bytes) -> str:
    """The message of an error body in one line (vLLM: {"error": {"message"}}; FastAPI: {"detail"}), or ""."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    err = data.get("error")
    msg = err.get("message") if isinstance(err, dict) else data.get("message") or data.get("detail")
    return " ".join(str(msg or "").split())[:500]


class EngineClient:
    """HTTP client of one vLLM OpenAI-compatible server at `url` (http://host:port). Standard library only.

    log: the server's log, named in errors (managed servers). alive: a callable raising EngineError when a
    managed server has died (given a grace in seconds to finish dying). on_close: what `close()` does when
    the caller is done with the engine (a managed server's stop); nothing for a server the user runs."""

    def __init__(self, url: str, *, timeout: float = 600.0, log: Path | None = None,
                 alive: Callable[..., None] | None = None, on_close: Callable[[], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.log = log
        self._alive = alive
        self._on_close = on_close
        self._card: dict[str, Any] | None = None  # the served model's card, asked once (model())

    def close(self) -> None:
        """Done with the engine: a managed server is stopped; a user's server is left alone."""
        if self._on_close is not None:
            self._on_close()

    # -- transport
    def _request(self, path: str, body: dict | None = None, *, timeout: float | None = None,
                 grace: float = DYING_GRACE_S) -> Any:
        if self._alive is not None:
            self._alive()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        failure = None
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            raise ServerHTTPError(self.url, path, exc.code, _error_detail(exc.read())) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, cut short
            failure = getattr(exc, "reason", exc)
        if failure is not None:  # handled outside the except block: an interrupt here chains no traceback
            if self._alive is not None and grace:
                # a dead managed server says so, with its log; a dying one closes its sockets before the
                # process is gone, so give it a moment to finish exiting
                self._alive(grace)
            where = f"; its log: {self.log}" if self.log else ""
            raise NoAnswerError(f"vLLM server {self.url} did not answer {path} ({failure}){where}")
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            raise BadAnswerError(f"vLLM server {self.url}{path} answered with a body that is not JSON "
                                 f"({len(raw)} bytes)") from None

    def _field(self, answer: Any, key: str, path: str) -> Any:
        if not isinstance(answer, dict) or key not in answer:
            raise BadAnswerError(f"vLLM server {self.url}{path} answered without {key!r}")
        return answer[key]

    def ping(self, timeout: float = CONNECT_TIMEOUT_S, grace: float = DYING_GRACE_S) -> None:
        """EngineError unless GET /health answers within `timeout` seconds."""
        self._request("/health", timeout=timeout, grace=grace)

    def model(self) -> dict[str, Any]:
        """The served model's card: {"id": served name, "root": path or id it loaded, "max_model_len": n}."""
        if self._card is None:
            data = self._field(self._request("/v1/models", timeout=CONNECT_TIMEOUT_S * 6), "data", "/v1/models")
            if len(data) != 1:
                raise EngineError(f"vLLM server {self.url} serves {len(data)} models; expected exactly one")
            self._card = data[0]
        return self._card

    def version(self, timeout: float = CONNECT_TIMEOUT_S * 6) -> str:
        """The server's vLLM version (GET /version)."""
        return str(self._field(self._request("/version", timeout=timeout), "version", "/version"))

    def tokenize(self, text: str) -> list[int]:
        """The server's tokenizer on `text`, special tokens not added."""
        out = self._request("/tokenize", {"model": self.model()["id"], "prompt": text, "add_special_tokens": False})
        return [int(t) for t in self._field(out, "tokens", "/tokenize")]

    def _completions(self, body: dict) -> list[dict]:
        """POST /v1/completions; its choices in request order. ConfigError in one line when the server allows
        fewer log-probs per token than asked (its --max-logprobs)."""
        try:
            answer = self._request("/v1/completions", body)
        except ServerHTTPError as exc:
            m = TOO_MANY_LOGPROBS.search(exc.detail) if exc.status == 400 else None
            if m is None:
                raise
            asked, allowed = m.groups()
            raise ConfigError(f"the vLLM server at {self.url} gives at most {allowed} log-probs per token (its "
                              f"--max-logprobs) and this run asks for {asked} (rollout.cache_top_k): restart it "
                              f"with --max-logprobs {asked}, or set rollout.cache_top_k={allowed}") from None
        return sorted(self._field(answer, "choices", "/v1/completions"), key=lambda c: c["index"])

    # -- teacher scores and samples
    def score(self, sequences: Sequence[Sequence[int]], top_k: int) -> list[list[dict[int, float] | None]]:
        """The served model's log-probs (temperature 1) over each sequence: for sequence s, entry t (t >= 1) is
        {token id: log p(token | s[:t])} for the top-`top_k` tokens and s[t] itself; entry 0 is None.
        One request for all sequences (a list of token-id prompts; vLLM batches them)."""
        if not sequences:
            return []
        body = {"model": self.model()["id"], "prompt": [[int(t) for t in seq] for seq in sequences],
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": int(top_k), "add_special_tokens": False}
        choices = self._completions(body)
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
        except ServerHTTPError as exc:
            if exc.status != 404:
                raise
            raise EngineError(f"vLLM server {self.url} has no /collective_rpc: start it with "
                              "VLLM_SERVER_DEV_MODE=1 to let the trainer push the student's weights") from None
        for _ in range(20):  # it refuses while blocks are held (running requests): none run between steps
            answer = self._request("/reset_prefix_cache", {})
            if not isinstance(answer, dict) or answer.get("success", True):
                return
            time.sleep(0.25)
        raise EngineError(f"vLLM server {self.url} did not drop its prefix cache after a weight reload "
                          f"(KV of the old weights would be reused); its log: {self.log}")

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
        return [Sample.from_choice(c) for c in self._completions(body)]


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


def connect(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> EngineClient:
    """A client of the vLLM server at `url` that answered /health and /version within `timeout` s; ConfigError
    in one line otherwise: nothing answered, or something answered that is not vLLM's OpenAI server."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"rollout.vllm_url={url!r} is not an http(s) URL; valid: http://host:port")
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    if path.endswith("/v1"):
        base = url.rstrip("/")[: -len("/v1")]
        raise ConfigError(f"rollout.vllm_url={url!r} ends in /v1, which the client adds to every request itself; "
                          f"drop the /v1 suffix: rollout.vllm_url={base}")
    client = EngineClient(url)
    try:
        client.ping(timeout=timeout)
        client.version(timeout=timeout)
    except NoAnswerError as exc:
        raise ConfigError(f"rollout.vllm_url={url!r}: no vLLM server answered within {timeout:g} s ({exc}); "
                          "start one (docs/serving.md) or leave rollout.vllm_url unset to start one here") from None
    except (ServerHTTPError, BadAnswerError) as exc:
        what = f"GET {exc.path}: HTTP {exc.status}" if isinstance(exc, ServerHTTPError) else str(exc)
        raise ConfigError(f"rollout.vllm_url={url!r} answered, but is not a vLLM OpenAI server ({what}); pass "
                          "the http://host:port of a `vllm serve` (docs/serving.md)") from None
    return client
