"""rollout.engine=vllm: the teacher data made by a served teacher, end to end through run.py, against a
fake serving env (tests/fake_vllm.py: transformers behind vLLM's HTTP API, on the tiny pair). What is ours is
tested here: the settings, the server started from the serving env and stopped at the end, the served model
checked against the configured target, the entries it makes. make test-vllm runs the real vLLM
(tests/test_vllm_engine.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import REPO, TINY
from fake_vllm import ctrl_c_reaches_python, run_py, servers_alive

from distillspec import constants as C

ARGS = TINY + ["stage=train", "rollout=teacher", "rollout.engine=vllm", "rollout.cache_store=false"]


def _run(run_dir, *extra, env=None):
    return run_py(ARGS, run_dir, *extra, env=env)



def test_a_run_takes_its_teacher_data_from_the_server_it_starts_and_stops_it(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    p = _run(run_dir, f"rollout.vllm_python={fake_python}")
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run_dir / "vllm_logs" / "teacher-server.log").read_text()
    assert "fake vllm serving" in log and "completions request" in log  # the teacher data came from it
    text = (run_dir / "run.log").read_text()
    assert "served teacher" in text and "matches" in text  # checked against the configured target first
    # stopped once the teacher data is made (nothing else uses it), before training steps
    assert text.index("stopped the vLLM server") < text.index("trained draft saved")
    assert (run_dir / "draft" / "config.json").is_file()
    assert not servers_alive(fake_python), "the teacher server outlived the run"


def test_a_server_with_other_weights_is_refused_by_name_before_training(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    p = _run(run_dir, f"rollout.vllm_python={fake_python}", env={"FAKE_VLLM_PERTURB": "3.0"})
    assert p.returncode == C.EXIT_CONFIG_ERROR, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()[-1]
    assert "whose log-probs differ from the configured target 'tiny:target'" in err
    assert not (run_dir / "checkpoints").exists() and not servers_alive(fake_python)


def test_settings_vllm_cannot_serve_are_refused_at_once(tmp_path):
    cases = {("div.temperature=2.0",): "div.temperature=2.0 with a served teacher",
             ("rollout=skd",): "SKD interleaves",
             ("rollout.cache_top_k=0",): "rollout.cache_top_k=0 turns it off",
             ("rollout.vllm_sync_every=0",): "rollout.vllm_sync_every=0; valid: an integer >= 1",
             ("rollout.teacher_location=gpu1",): "unknown rollout.teacher_location 'gpu1'; valid choices: process, server",
             ("rollout.teacher_location=server", "rollout.teacher_logits=dense"): "gives the teacher's top-k log-probs only",
             ("rollout.teacher_location=server", "rollout.engine=hf"): "rollout.teacher_location=server needs rollout.engine=vllm",
             ("rollout.vllm_url=localhost:8000",): "is not an http(s) URL",
             ("rollout.vllm_port=70000",): "rollout.vllm_port=70000 is out of range",
             ("rollout.engine=vlm",): "unknown rollout.engine 'vlm'; valid choices: hf, vllm"}
    for extra, want in cases.items():
        t0 = time.monotonic()
        p = _run(tmp_path / "x", *extra)
        assert p.returncode == C.EXIT_CONFIG_ERROR and want in p.stderr, (extra, p.stderr[-2000:])
        assert time.monotonic() - t0 < 60


def test_a_server_url_that_does_not_answer_fails_within_seconds(tmp_path):
    from distillspec.serving.server import free_port

    t0 = time.monotonic()
    p = _run(tmp_path / "run", f"rollout.vllm_url=http://127.0.0.1:{free_port()}")
    assert p.returncode == C.EXIT_CONFIG_ERROR and "no vLLM server answered" in p.stderr, p.stderr[-2000:]
    assert time.monotonic() - t0 < 120  # run.py start-up and model loading included; the probe itself takes ~0 s


def test_a_serving_python_without_vllm_is_one_line_and_leaves_no_run_dir(tmp_path):
    p = _run(tmp_path / "run", "rollout.vllm_python=/bin/true")
    assert p.returncode == C.EXIT_CONFIG_ERROR, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()[-1]
    assert "/bin/true is not a python with vLLM" in err and "make vllm" in err, err
    assert not (tmp_path / "run").exists()  # refused before the run started: nothing left behind


def test_served_entries_of_dataset_outputs_equal_the_in_process_cache(fake_python, tmp_path, tiny_pair_dirs):
    """The served path's entries (top-k, tail) equal TeacherCache's own for the same sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillspec.rollout.teacher_cache import TeacherCache
    from distillspec.serving.server import ManagedServer
    from distillspec.tasks.arithmetic import ArithmeticTask

    _, target_dir = tiny_pair_dirs
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(target_dir)
    task = ArithmeticTask(num_train=8, num_eval=4)
    items = task.encode(task.load("train"), tok, limit=4, seed=0)
    kw = dict(top_k=8, temperature=1.0, sample_temperature=1.0, top_p=1.0, max_new_tokens=12,
              eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    ours, served = TeacherCache(items, "fixed", **kw), TeacherCache(items, "fixed", **kw)
    ours.build(model, torch.device("cpu"), seed=0, batch_size=4, progress=False)
    with ManagedServer(str(target_dir), python=fake_python, log=tmp_path / "log") as client:
        served.build(model, torch.device("cpu"), seed=0, batch_size=4, progress=False, engine=client)
    for i, e in ours.entries.items():
        s = served.entries[i]
        assert torch.equal(s.tokens, e.tokens) and torch.equal(s.topk_idx, e.topk_idx)
        assert torch.allclose(s.topk_logp, e.topk_logp, atol=1e-5)
        assert torch.allclose(s.tail_logp.exp(), e.tail_logp.exp(), atol=1e-5)


def test_a_server_dying_mid_run_stops_the_run_naming_its_log_and_a_rerun_finishes(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    # the probe check is request 1; the teacher data's first batch request 2: the server dies there
    p = _run(run_dir, f"rollout.vllm_python={fake_python}", env={"FAKE_VLLM_DIE_AFTER": "1"})
    assert p.returncode == C.EXIT_ENGINE_ERROR, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()[-1]
    log = run_dir / "vllm_logs" / "teacher-server.log"
    assert "error: the vLLM server for" in err and str(log) in err and "exited" in err
    assert "fake engine died" in log.read_text()
    p = _run(run_dir, f"rollout.vllm_python={fake_python}")  # the same command again
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "draft" / "config.json").is_file() and not servers_alive(fake_python)


def test_stored_served_data_is_reused_without_a_server_and_only_for_the_same_server_arguments(fake_python, tmp_path):
    """The teacher-data store: a second run with the same settings loads the first's served data and starts no
    server (vLLM's version, part of the data's key, is read from the serving env); other `vllm serve` arguments
    (e.g. another --seed) make other data."""
    args = [a for a in ARGS if a != "rollout.cache_store=false"]
    env = {"DISTILLSPEC_TEACHER_DATA": str(tmp_path / "store")}

    def run(name, *extra):
        p = run_py(args, tmp_path / name, f"rollout.vllm_python={fake_python}", *extra, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return (tmp_path / name / "run.log").read_text()

    assert "teacher data (teacher, 16 prompts) loaded from" not in run("a")
    assert "teacher data (teacher, 16 prompts) loaded from" in run("b")
    assert not (tmp_path / "b" / "vllm_logs").exists(), "the stored data's run started a teacher server"
    assert "teacher data (teacher, 16 prompts) loaded from" not in run("c", "rollout.vllm_args=[--seed,1]")
    assert len(list((tmp_path / "store").glob("*.pt"))) == 2


def test_ctrl_c_while_the_teacher_server_starts_is_one_line_and_stops_it(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_VLLM_START_DELAY": "120"}
    proc = subprocess.Popen([sys.executable, "run.py", *ARGS, f"rollout.vllm_python={fake_python}",
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_python)
    log = run_dir / "vllm_logs" / "teacher-server.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "fake vllm serving" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert servers_alive(fake_python), "the teacher server did not start"
    time.sleep(1.0)  # in the readiness wait
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in out + err and "During handling" not in out + err, err[-3000:]
    assert (out + err).count("KeyboardInterrupt") == 1, out[-3000:]  # one line says it
    assert not servers_alive(fake_python), "the teacher server outlived the interrupted run"
