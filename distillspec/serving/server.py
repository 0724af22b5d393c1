"""A vLLM server started from the serving env for the length of a run's need; vLLM is never imported here.

`ManagedServer` starts `vllm serve` from the serving env (`.venv-vllm`, `make vllm`) on loopback, waits until
it answers, and stops it when the `with` block ends: normally, on an error, on Ctrl-C. The server leads its own
process group, which holds vLLM's engine processes (EngineCore, Worker, resource_tracker); stopping it signals
the whole group (SIGTERM, then SIGKILL) and waits until no process of it runs, even when the server itself was
killed first. On Linux the server also gets SIGTERM when the process that started it dies (PR_SET_PDEATHSIG),
so `kill -9` of a training run leaves no engine behind. Its log is a file the caller names (kept under the run
dir), so an error can point at it after the fact.

`LazyClient` starts one at the first request that needs it: a run whose teacher data is stored starts none.
A server the user runs is reached with `distillspec.serving.client.connect(url)`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from distillspec.errors import ConfigError, EngineError
from distillspec.serving.client import EngineClient, NoAnswerError, Sample

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 900.0       # model load on a CPU takes ~20-60 s; a large model on a GPU minutes
# SIGTERM to SIGKILL for an engine whose server is gone (killed, crashed): it has no one to shut down for, and its
# graceful exit took 11.5 s once orphaned (vLLM 0.32 CPU, 2-core machine under load)
ORPHAN_GRACE_S = 2.0


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


def _group_alive(pgid: int) -> bool:
    """Whether a process of process group `pgid` still runs (a zombie, exited but not reaped, does not)."""
    procfs = Path("/proc")
    if not procfs.is_dir():  # no procfs: ask the kernel, which counts zombies too
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for d in procfs.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _wait_group(proc: subprocess.Popen, timeout: float) -> bool:
    """Reap `proc` (the group's leader) and wait until no process of its group runs; False after `timeout` s."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class ManagedServer(contextlib.AbstractContextManager):
    """`vllm serve MODEL` from the serving env on loopback, for the length of a `with` block (or from `start()`
    to `stop()`).

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
        """Start the server and wait until it answers; a failure or an interrupt on the way stops it."""
        from distillspec.serving.env import check_serving_python, server_env

        check_serving_python(self.python)
        if self.port is not None:
            check_port_free(self.port)
        port = self.port if self.port is not None else free_port()
        self.argv = self.command(port)
        env = server_env(os.environ, self.extra_env)
        if "--kv-cache-memory-bytes" not in self.args:  # unset on a CPU, vLLM wants 92 % of the machine's memory
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        log.info("starting vLLM for %s from %s (log %s)", self.model, self.python, self.log)
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            logf = open(self.log, "ab")
        except OSError as exc:
            raise ConfigError(f"cannot write the vLLM server's log {self.log} ({exc.strerror or exc}); free space "
                              "or fix the run dir's permissions") from None
        with logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.client = EngineClient(f"http://{LOOPBACK}:{port}", log=self.log, alive=self.check_alive,
                                   on_close=self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.client

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            self.check_alive()
            try:
                self.client.ping(timeout=2.0, grace=0.0)  # refused while it loads: no grace to wait out
                return
            except NoAnswerError:
                pass
            if time.monotonic() > deadline:
                raise EngineError(f"vLLM server for {self.model} was not ready after {self.ready_timeout:.0f} s;"
                                  f" stopped it; its log: {self.log}")
            time.sleep(0.5)

    def check_alive(self, grace: float = 0.0) -> None:
        """EngineError naming the log when the server process has exited (or exits within `grace` s)."""
        if self.proc is not None and grace > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            raise EngineError(f"the vLLM server for {self.model} exited (code {code}); its log: {self.log}"
                              f" (last lines: {_tail(self.log)})")

    def stop(self, grace: float = 15.0) -> None:
        """Stop the server and every process of its group (vLLM's engine processes), whatever state the server
        process is in (running, exited, killed): SIGTERM, then SIGKILL after `grace` s (ORPHAN_GRACE_S when the
        server has already exited). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            grace = min(grace, ORPHAN_GRACE_S)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None and not _group_alive(proc.pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # start_new_session: the server leads its group, pgid = its pid
            if _wait_group(proc, wait):
                break
        else:
            log.warning("processes of the vLLM server's group %d outlived SIGKILL (log %s)", proc.pid, self.log)
        log.info("stopped the vLLM server for %s (pid %d; log %s)", self.model, proc.pid, self.log)

    def __enter__(self) -> EngineClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LazyClient:
    """The client of a ManagedServer that is started by the first request needing it, and only then: a run whose
    teacher data is stored starts no server.

    version: the serving env's vLLM version (read without a server: `serving.env.serving_vllm_version`), which
    `version()` answers. on_start(client): run once the server answers, before the request that started it
    (e.g. the check that it serves the configured model); the server is stopped when it raises.
    """

    def __init__(self, server: ManagedServer, *, version: str,
                 on_start: Callable[[EngineClient], None] | None = None) -> None:
        self.server, self._version, self._on_start = server, version, on_start
        self._client: EngineClient | None = None
        self._closed = False
        self.needed = False  # whether a request asked for the server (it was started, or tried to start)

    def client(self) -> EngineClient:
        """The server's client, the server started (and `on_start` run) first when it is not yet."""
        if self._closed:
            raise RuntimeError(f"the vLLM server for {self.server.model} was closed; it serves no more requests")
        self.needed = True
        if self._client is None:
            client = self.server.start()
            try:
                if self._on_start is not None:
                    self._on_start(client)
            except BaseException:
                self.server.stop()
                raise
            self._client = client
        return self._client

    def version(self) -> str:
        return self._version

    def model(self) -> dict[str, Any]:
        return self.client().model()

    def tokenize(self, text: str) -> list[int]:
        return self.client().tokenize(text)

    def score(self, sequences: Sequence[Sequence[int]], top_k: int) -> list[list[dict[int, float] | None]]:
        return self.client().score(sequences, top_k)

    def sample(self, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[Sample]:
        return self.client().sample(prompts, **kwargs)

    def close(self) -> None:
        """Done with the engine: the server is stopped if it was started. Idempotent."""
        self._closed = True
        self.server.stop()
