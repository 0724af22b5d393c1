"""A fake serving env for fast tests: `<dir>/bin/python` answers the vLLM version probe and `<dir>/bin/vllm serve
MODEL` is a small HTTP server that speaks the part of vLLM's API distillspec uses, computing with transformers
on MODEL (the tiny pair): /health, /version, /v1/models, /tokenize, and /v1/completions with token-id prompts
(`prompt_logprobs`; sampling with `logprobs`, `return_token_ids`, `stop_token_ids`). It is not vLLM: what it
tests is our side (settings, start and stop, requests, the teacher cache, the checks). make test-vllm runs the
real one. FAKE_VLLM_PERTURB=<x> adds x * N(0, 1) noise to its logits (a server with other weights);
FAKE_VLLM_DIE_AFTER=<n> kills the server at its (n+1)-th completions request (an engine dying mid-run);
FAKE_VLLM_MODE=crash exits at start-up (a model that fails to load); FAKE_VLLM_PIDFILE=<file> gets its pid;
FAKE_VLLM_CHILDREN=<n> starts n processes in its process group (vLLM's EngineCore and Worker; their pids go to
<pidfile>.children); FAKE_VLLM_START_DELAY=<s> waits s seconds before it answers (a model load). As vLLM, it
refuses more log-probs than its --max-logprobs (default 20) with HTTP 400.
With VLLM_SERVER_DEV_MODE=1 it also answers POST /collective_rpc reload_weights (reloads the safetensors of
kwargs.weights_path) and /reset_prefix_cache, as vLLM's dev mode does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SERVER = textwrap.dedent('''\
    #!{python}
    import http.server, json, os, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = sys.argv[1:]
    assert args[0] == "serve", args
    name, port = args[1], int(args[args.index("--port") + 1])
    print("fake vllm serving", name, "on", port, flush=True)
    if os.environ.get("FAKE_VLLM_MODE") == "crash":
        print("RuntimeError: fake engine failed to load", flush=True)
        sys.exit(3)
    if os.environ.get("FAKE_VLLM_PIDFILE"):
        with open(os.environ["FAKE_VLLM_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
    import subprocess, time
    children = [subprocess.Popen(["sleep", "600"]) for _ in range(int(os.environ.get("FAKE_VLLM_CHILDREN", "0")))]
    if children:  # vLLM's EngineCore and Worker: processes of the server's process group
        with open(os.environ["FAKE_VLLM_PIDFILE"] + ".children", "w") as f:
            f.write(" ".join(str(c.pid) for c in children))
    time.sleep(float(os.environ.get("FAKE_VLLM_START_DELAY", "0")))  # a model load
    torch.set_num_threads(1)
    model = tok = None
    if os.path.isdir(name):  # a model dir (another name: a server that only answers /health and /v1/models)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(name)
    noise = float(os.environ.get("FAKE_VLLM_PERTURB", "0"))
    max_logprobs = int(args[args.index("--max-logprobs") + 1]) if "--max-logprobs" in args else 20  # vLLM's default
    gen = torch.Generator().manual_seed(int(args[args.index("--seed") + 1]) if "--seed" in args else 0)
    requests = 0

    def logprobs(ids):  # (len(ids), V) log-probs of the token after each prefix
        with torch.no_grad():
            x = model(torch.tensor([ids])).logits[0].float()
        if noise:
            x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        return torch.log_softmax(x, -1)

    def top(lp, k, extra=None):
        vals, idx = lp.topk(min(k, lp.numel()))
        d = dict(zip(idx.tolist(), vals.tolist()))
        if extra is not None:
            d[extra] = lp[extra].item()
        return d

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def _send(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def _error(self, code, message, param=None):  # vLLM's error body
            body = json.dumps({{"error": {{"message": message, "type": "BadRequestError", "param": param,
                                          "code": code}}}}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            if self.path == "/health":
                self._send(None)
            elif self.path == "/version":
                self._send({{"version": "0.0-fake"}})
            elif self.path == "/v1/models":
                self._send({{"data": [{{"id": name, "root": name, "max_model_len": 1024}}]}})
        def do_POST(self):
            global requests
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                return self._send({{"tokens": tok(req["prompt"], add_special_tokens=False)["input_ids"]}})
            if self.path in ("/collective_rpc", "/reset_prefix_cache"):
                if os.environ.get("VLLM_SERVER_DEV_MODE") != "1":  # vLLM attaches these routes in dev mode only
                    self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
                    return
                if self.path == "/collective_rpc":
                    assert req["method"] == "reload_weights", req
                    import glob
                    from safetensors.torch import load_file
                    state = {{}}
                    for f in sorted(glob.glob(os.path.join(req["kwargs"]["weights_path"], "*.safetensors"))):
                        state.update(load_file(f))
                    model.load_state_dict(state, strict=False)
                    model.tie_weights()
                    print("reloaded weights from", req["kwargs"]["weights_path"], flush=True)
                return self._send(None)
            for key, what in (("prompt_logprobs", "prompt"), ("logprobs", "sample")):
                if (req.get(key) or 0) > max_logprobs:
                    return self._error(400, f"Requested {{what}} logprobs of {{req[key]}}, which is greater than "
                                            f"max allowed: {{max_logprobs}}", key)
            requests += 1
            print("completions request", requests, flush=True)
            if requests > int(os.environ.get("FAKE_VLLM_DIE_AFTER", "1000000")):
                print("fake engine died", flush=True)
                os._exit(9)
            prompts = req["prompt"] if isinstance(req["prompt"][0], list) else [req["prompt"]]
            choices = []
            for i, p in enumerate(prompts):
                if req.get("prompt_logprobs"):
                    lp = logprobs(p)
                    rows = [None] + [{{str(t): {{"logprob": v}} for t, v in top(lp[j - 1], req["prompt_logprobs"], p[j]).items()}}
                                     for j in range(1, len(p))]
                    choices.append({{"index": i, "prompt_logprobs": rows, "token_ids": []}})
                    continue
                ids, out, tops, reason = list(p), [], [], "length"
                for _ in range(req["max_tokens"]):
                    lp = logprobs(ids)[-1]
                    if not req.get("temperature"):  # greedy
                        t = int(lp.argmax())
                    else:
                        probs = torch.softmax(lp / req["temperature"], -1)
                        top_p = float(req.get("top_p") or 1.0)
                        if top_p < 1.0:  # keep the smallest set of most likely tokens holding top_p
                            sp, si = probs.sort(descending=True)
                            drop = (sp.cumsum(-1) - sp) >= top_p
                            probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
                        t = int(torch.multinomial(probs, 1, generator=gen))
                    out.append(t)
                    tops.append({{f"token_id:{{k}}": v for k, v in top(lp, req.get("logprobs") or 1, t).items()}})
                    ids.append(t)
                    if t in (req.get("stop_token_ids") or []) or t == tok.eos_token_id:
                        reason = "stop"
                        break
                choices.append({{"index": i, "token_ids": out, "finish_reason": reason, "logprobs": {{
                    "tokens": [f"token_id:{{t}}" for t in out], "top_logprobs": tops}}}})
            self._send({{"choices": choices}})
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def ctrl_c_reaches_python() -> None:
    """preexec_fn for a child a test interrupts with SIGINT: SIGINT back to its default, so Python installs its
    KeyboardInterrupt handler. A test run launched in the background (`nohup make test &`) ignores SIGINT, and
    its children would inherit that and never see the Ctrl-C the test sends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_py(args: list[str], run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS EXTRA hydra.run.dir=RUN_DIR` in the repo, one thread, env added to the environment."""
    repo = Path(__file__).resolve().parents[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run.py", *args, *extra, f"hydra.run.dir={run_dir}"], cwd=repo,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=600)


def servers_alive(fake_python: Path) -> list[str]:
    """The fake env's server processes still running."""
    out = subprocess.run(["pgrep", "-af", f"{fake_python.parent}/vllm serve"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


def make_fake_env(root: Path) -> Path:
    """Write the fake serving env under `root`; returns its python (pass as rollout.vllm_python)."""
    bindir = Path(root) / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    py = bindir / "python"
    py.write_text(f"#!/bin/sh\n[ \"$1\" = -c ] && echo 0.32.0-fake && exit 0\nexec {sys.executable} \"$@\"\n")
    vllm = bindir / "vllm"
    vllm.write_text(SERVER.format(python=sys.executable))
    for f in (py, vllm):
        f.chmod(0o755)
    return py
