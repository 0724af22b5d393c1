"""The vLLM server's life cycle (distillspec.serving.server) against a fake serving env: no vLLM needed.

The fake env is what `make vllm` leaves, in miniature: `bin/python` answers the version probe, and `bin/vllm`
is a small HTTP server speaking the endpoints the client uses. What is checked is ours: the server starts,
answers, stops at the end of the block, on an error, on Ctrl-C and when its parent is killed (no orphan), a
dead server is reported with its log, a port in use and a silent URL fail fast in one line.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fake_vllm import ctrl_c_reaches_python, make_fake_env

from distillspec.errors import ConfigError, EngineError
from distillspec.serving.env import check_serving_python
from distillspec.serving.client import EngineClient, connect
from distillspec.serving.server import ManagedServer, check_port_free, free_port

@pytest.fixture()
def fake_env(tmp_path, monkeypatch) -> Path:
    """A fake serving env (tests/fake_vllm.py); returns its python. The server writes its pid to server.pid."""
    monkeypatch.setenv("FAKE_VLLM_PIDFILE", str(tmp_path / "server.pid"))
    return make_fake_env(tmp_path / "venv")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_started_server_answers_and_is_stopped_at_block_end(fake_env, tmp_path, tiny_pair_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    target = str(tiny_pair_dirs[1])
    with ManagedServer(target, python=fake_env, log=tmp_path / "vllm.log") as client:
        assert client.model()["id"] == target
        seq = [5, 6, 8, 9]
        scores = client.score([seq], top_k=2)[0]
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
        assert scores[0] is None and len(scores) == len(seq)
        for t in range(1, len(seq)):  # the top-2 and the actual token, as vLLM's prompt_logprobs
            want = set(lp[t - 1].topk(2).indices.tolist()) | {seq[t]}
            assert set(scores[t]) == want
            assert all(abs(v - lp[t - 1, k].item()) < 1e-5 for k, v in scores[t].items())
        pid = int((tmp_path / "server.pid").read_text())
        assert _alive(pid)
    assert _wait_gone(pid), "the server outlived its with-block"
    assert f"fake vllm serving {target}" in (tmp_path / "vllm.log").read_text()


def test_server_does_not_inherit_the_training_shells_thread_counts(fake_env, tmp_path, monkeypatch):
    # vLLM's CPU backend sizes its own threads; an inherited OMP_NUM_THREADS made it 5x slower (server.py)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    monkeypatch.setenv("DISTILLSPEC_SOME_SETTING", "kept")
    for extra, want in (({}, None), ({"OMP_NUM_THREADS": "3"}, "3")):
        with ManagedServer("m", python=fake_env, log=tmp_path / "vllm.log", env=extra):
            pid = int((tmp_path / "server.pid").read_text())
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        assert env.get("OMP_NUM_THREADS") == want and "MKL_NUM_THREADS" not in env
        assert env["DISTILLSPEC_SOME_SETTING"] == "kept"


def test_server_is_stopped_when_the_block_raises(fake_env, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ManagedServer("m", python=fake_env, log=tmp_path / "vllm.log"):
            pid = int((tmp_path / "server.pid").read_text())
            raise RuntimeError("boom")
    assert _wait_gone(pid)


def test_server_that_dies_at_start_is_reported_with_its_log(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    log = tmp_path / "logs" / "vllm.log"
    with pytest.raises(EngineError) as err:
        with ManagedServer("m", python=fake_env, log=log):
            pass
    msg = str(err.value)
    assert str(log) in msg and "exited (code 3)" in msg and "fake engine failed to load" in msg
    assert log.exists()


def test_server_dying_mid_run_is_an_error_naming_the_log(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "0")
    log = tmp_path / "vllm.log"
    with ManagedServer("m", python=fake_env, log=log) as client:
        with pytest.raises(EngineError, match=str(log)):
            client.score([[1, 2]], top_k=1)


DRIVER = textwrap.dedent('''\
    import sys, time
    from pathlib import Path
    from distillspec.serving.server import ManagedServer
    with ManagedServer("m", python=Path(sys.argv[1]), log=Path(sys.argv[2])):
        print("ready", flush=True)
        time.sleep(600)
''')


def _driver(fake_env, tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(fake_env), str(tmp_path / "vllm.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_python)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_no_orphan_engine_when_the_run_is_interrupted_or_killed(fake_env, tmp_path, sig):
    proc = _driver(fake_env, tmp_path)
    pid = int((tmp_path / "server.pid").read_text())
    assert _alive(pid)
    proc.send_signal(sig)
    proc.wait(30)
    assert _wait_gone(pid), f"the vLLM server (pid {pid}) outlived its parent after {sig.name}"


def test_port_in_use_is_refused_before_starting(fake_env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} .* already in use"):
            check_port_free(port)
        with pytest.raises(ConfigError, match="already in use"):
            with ManagedServer("m", python=fake_env, log=tmp_path / "vllm.log", port=port):
                pass
    assert not (tmp_path / "server.pid").exists()


def test_url_that_does_not_answer_fails_within_seconds():
    closed = free_port()  # nothing listens: refused at once
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="no vLLM server answered"):
        connect(f"http://127.0.0.1:{closed}")
    with socket.socket() as s:  # listens but never answers: the connect timeout, not a hang
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="rollout.vllm_url"):
            connect(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=1.0)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="not an http"):
        connect("127.0.0.1:8000")


def test_missing_or_broken_serving_env_says_make_vllm(tmp_path):
    with pytest.raises(ConfigError, match="not found; run `make vllm`"):
        check_serving_python(tmp_path / "nope" / "bin" / "python")
    with pytest.raises(ConfigError, match="cannot import vllm .*make vllm"):
        check_serving_python(Path(sys.executable))  # the project env has no vLLM
    not_a_program = tmp_path / "python"
    not_a_program.write_bytes(b"\x7fELF\x00garbage")
    not_a_program.chmod(0o755)
    with pytest.raises(ConfigError, match="cannot run .*make vllm"):
        check_serving_python(not_a_program)


def test_client_reads_token_ids_of_samples():
    from distillspec.serving.client import Sample

    s = Sample.from_choice({"finish_reason": "stop", "logprobs": {
        "tokens": ["token_id:5", "token_id:2"],
        "top_logprobs": [{"token_id:5": -0.1, "token_id:9": -2.3}, {"token_id:2": -0.01}]}})
    assert s.tokens == [5, 2] and s.top_logprobs == [{5: -0.1, 9: -2.3}, {2: -0.01}] and s.finish_reason == "stop"
    with pytest.raises(EngineError, match="without its id"):
        Sample.from_choice({"logprobs": {"tokens": ["hello"], "top_logprobs": []}})
    assert EngineClient("http://x:1/").url == "http://x:1"


def test_a_server_that_drops_a_request_and_then_exits_is_reported_as_exited(tmp_path):
    """A dying engine closes its sockets a moment before its process is gone. The dropped request must still be
    reported as the server's exit, with its log, not as an unanswered request (this raced on a loaded CI box)."""
    port = free_port()
    script = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port})); s.listen(1)
        print("ready", flush=True)
        c, _ = s.accept(); c.recv(65536); c.close(); s.close()
        print("engine core died", flush=True)
        time.sleep(1.0)
        raise SystemExit(9)
    """)
    log = tmp_path / "server.log"
    srv = ManagedServer("m", python=Path(sys.executable), log=log)
    with open(log, "wb") as logf:
        srv.proc = subprocess.Popen([sys.executable, "-c", script], stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = EngineClient(f"http://127.0.0.1:{port}", log=log, alive=srv.check_alive)
        with pytest.raises(EngineError) as err:
            client._request("/v1/completions", {"prompt": [1]})
        msg = str(err.value)
        assert msg.startswith("the vLLM server for m exited (code 9)") and str(log) in msg, msg
        assert "engine core died" in msg
    finally:
        srv.stop()


def test_kill_9_of_a_server_stops_the_engine_processes_of_its_group(fake_env, tmp_path, monkeypatch):
    """vLLM's server runs its engine in processes of its own process group (EngineCore, Worker,
    resource_tracker). When the server itself is killed, its stop still ends the group: within 10 s."""
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "2")
    children: list[int] = []
    try:
        with pytest.raises(EngineError, match=r"exited \(code -9\)"):
            with ManagedServer("m", python=fake_env, log=tmp_path / "vllm.log") as client:
                children = [int(c) for c in (tmp_path / "server.pid.children").read_text().split()]
                assert len(children) == 2 and all(_alive(c) for c in children)
                os.kill(int((tmp_path / "server.pid").read_text()), signal.SIGKILL)
                client.model()  # the next request finds the server gone
        assert all(_wait_gone(c, timeout=10.0) for c in children), "the killed server's engine outlived its stop"
    finally:
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)


def test_a_program_that_is_not_a_python_with_vllm_is_named_in_one_line():
    """`rollout.vllm_python=/bin/true`: it runs and prints nothing."""
    with pytest.raises(ConfigError) as err:
        check_serving_python(Path("/bin/true"))
    msg = str(err.value)
    assert "/bin/true is not a python with vLLM" in msg and "make vllm" in msg and "\n" not in msg


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@contextlib.contextmanager
def _http_server(directory: Path):
    """A plain file server (Python's http.server) on a free loopback port: it answers, but is not vLLM."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_url_that_answers_but_is_not_vllm_says_so_in_one_line(tmp_path):
    with _http_server(tmp_path) as url:  # GET /health: 404 with an HTML page
        with pytest.raises(ConfigError) as err:
            connect(url)
        msg = str(err.value)
        assert "answered, but is not a vLLM OpenAI server" in msg and "HTTP 404" in msg, msg
        assert "<" not in msg and "\n" not in msg  # no HTML pasted
        (tmp_path / "health").write_text("<html><body>ok</body></html>")  # GET /health: 200 with HTML
        with pytest.raises(ConfigError, match="answered, but is not a vLLM OpenAI server") as err:
            connect(url)
        assert "<" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"ends in /v1.*drop the /v1 suffix: rollout.vllm_url=http://127.0.0.1:8000$"):
        connect("http://127.0.0.1:8000/v1")


def test_a_server_without_enough_max_logprobs_says_how_to_restart_it(fake_env, tmp_path, tiny_pair_dirs):
    """A user's `vllm serve` without --max-logprobs allows 20 log-probs per token; the run asks for
    rollout.cache_top_k (64): one line saying how to restart the server, before any teacher data is made."""
    from types import SimpleNamespace

    from distillspec.rollout.engine import rollout_engine

    target = str(tiny_pair_dirs[1])
    with ManagedServer(target, python=fake_env, log=tmp_path / "vllm.log") as client:  # no --max-logprobs
        with pytest.raises(ConfigError) as err:
            client.score([[5, 6, 8]], top_k=64)
        msg = str(err.value)
        assert "--max-logprobs 64" in msg and "rollout.cache_top_k=20" in msg and "\n" not in msg, msg
        spec = SimpleNamespace(engine="vllm", vllm_url=client.url, cache_top_k=64, serves_teacher_logprobs=lambda: True)
        with pytest.raises(ConfigError, match="restart it with --max-logprobs 64"):
            with rollout_engine(spec, target=target, dtype="float32", run_dir=tmp_path, prompt_lens=[8],
                                max_new_tokens=8, seed=0):
                pytest.fail("the run went on with a server that cannot give it its log-probs")
