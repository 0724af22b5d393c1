"""Student rollouts on vLLM: a served student samples the on-policy data and its weights follow
training (distillspec.rollout.student_server), against the fake serving env (tests/fake_vllm.py). What is ours
is tested: the sync (save, reload, when), the rollouts' layout, the run's wiring, start, stop and faults.
make test-vllm runs the same sync check on the real vLLM (tests/test_vllm_engine.py)."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
from conftest import TINY
from fake_vllm import run_py, servers_alive
from student_sync import train_and_compare

from distillspec import constants as C

ARGS = TINY + ["stage=train", "rollout=student", "rollout.engine=vllm", "train.max_steps=3"]


def _run(run_dir, *extra, env=None):
    return run_py(ARGS, run_dir, *extra, env=env)


@pytest.mark.parametrize("sync", [True, False])
def test_served_students_greedy_continuations_equal_ours_after_training(fake_python, tiny_pair_dirs, tmp_path,
                                                                        monkeypatch, sync):
    """After 3 steps trained on its own served samples, the served student's greedy continuations of 8 prompts
    equal the in-process student's token for token; with the syncs skipped they do not (the check has teeth)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = train_and_compare(fake_python, tiny_pair_dirs[0], tmp_path / "run", sync=sync, lr=3e-2)
    assert out["ours"] != out["before"], "training did not change the greedy outputs: the check would be empty"
    if sync:
        assert out["served"] == out["ours"] and out["syncs"] == 4
    else:
        assert out["served"] != out["ours"] and out["syncs"] == 1


def test_a_run_with_student_rollouts_on_vllm_syncs_every_step_and_stops_its_server(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    p = _run(run_dir, f"rollout.vllm_python={fake_python}")
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run_dir / "vllm_logs" / "student-server.log").read_text()
    # started from the step-0 student, then reloaded before steps 1 and 2
    assert log.count("reloaded weights from") == 2 and log.count("completions request") == 3 * 1, log[-2000:]
    assert not (run_dir / "vllm_logs" / "teacher-server.log").exists()  # the teacher stays in process
    assert (run_dir / "draft" / "config.json").is_file() and not servers_alive(fake_python)


def test_sync_every_n_steps(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    p = _run(run_dir, f"rollout.vllm_python={fake_python}", "rollout.vllm_sync_every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run_dir / "vllm_logs" / "student-server.log").read_text()
    assert log.count("reloaded weights from") == 1  # at step 2 (step 0 started it)


def test_a_student_server_dying_mid_run_stops_the_run_and_a_rerun_resumes(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    p = _run(run_dir, f"rollout.vllm_python={fake_python}", env={"FAKE_VLLM_DIE_AFTER": "1"})
    assert p.returncode == C.EXIT_ENGINE_ERROR, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()[-1]
    log = run_dir / "vllm_logs" / "student-server.log"
    assert "the vLLM server for" in err and str(log) in err and "exited" in err, err
    assert (run_dir / "checkpoints").is_dir() and not servers_alive(fake_python)
    p = _run(run_dir, f"rollout.vllm_python={fake_python}")  # the same command again: resumes
    assert p.returncode == 0, p.stderr[-3000:]
    train = json.loads((run_dir / C.METRICS_FILE).read_text())["train"]
    assert train["resumed_from"] is not None and train["steps"] == 3 and (run_dir / "draft" / "config.json").is_file()


def test_student_rollouts_on_vllm_refuse_what_they_cannot_do(tmp_path):
    for extra, want in {("train.lora_rank=4",): "train.lora_rank=4: the server reloads full weights",
                        ("trainer.devices=2",): "with 2 training processes",
                        ("rollout.vllm_url=http://127.0.0.1:9",): "is the teacher's server, but this run asks it for "
                                                                   "nothing"}.items():
        p = _run(tmp_path / "x", *extra, f"rollout.vllm_python={sys.executable}")
        assert p.returncode == C.EXIT_CONFIG_ERROR and want in p.stderr, (extra, p.stderr[-2000:])


def test_a_tied_student_is_saved_untied_for_vllm(tiny_pair_dirs, tmp_path):
    """vLLM 0.32's in-place reload leaves a tied output head on old weights (make test-vllm shows it): the
    served copy is written untied, its head a tensor of its own equal to the embedding."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillspec.rollout.student_server import StudentServer

    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dirs[0], dtype=torch.float32)
    assert student.config.tie_word_embeddings
    server = StudentServer(python=tmp_path / "py", run_dir=tmp_path, tokenizer=AutoTokenizer.from_pretrained(
        tiny_pair_dirs[0]), dtype="float32", max_model_len=64, sync_every=1)
    with torch.no_grad():
        student.get_input_embeddings().weight.add_(1.0)
    server._save(student)
    state = load_file(str(server.weights_dir / "model.safetensors"))
    config = json.loads((server.weights_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["LlamaForCausalLM"]
    assert torch.equal(state["lm_head.weight"], student.get_input_embeddings().weight)
    assert torch.equal(state["model.embed_tokens.weight"], student.get_input_embeddings().weight)
    assert set(state) == set(student.state_dict())


def _student_and_server(tiny_pair_dirs, run_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillspec.rollout.student_server import StudentServer

    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dirs[0], dtype=torch.float32)
    server = StudentServer(python=run_dir / "py", run_dir=run_dir, tokenizer=AutoTokenizer.from_pretrained(
        tiny_pair_dirs[0]), dtype="float32", max_model_len=64, sync_every=1)
    return student, server


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "disk-full"])
def test_an_unwritable_student_dir_is_one_line_naming_it(tiny_pair_dirs, tmp_path, monkeypatch, code):
    from distillspec.errors import ConfigError

    student, server = _student_and_server(tiny_pair_dirs, tmp_path)

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(ConfigError) as err:
        server._save(student)
    msg = str(err.value)
    assert str(server.weights_dir) in msg and os.strerror(code) in msg and "\n" not in msg, msg


def test_a_save_cut_short_by_a_full_disk_leaves_no_half_dir_and_a_rerun_works(tiny_pair_dirs, tmp_path, monkeypatch):
    """The served student's directory is written whole or not at all: a save that fails half-way through the
    tokenizer leaves nothing vLLM could load, and the next run's save gives a complete, loadable directory."""
    from transformers import AutoConfig, AutoTokenizer

    student, server = _student_and_server(tiny_pair_dirs, tmp_path)
    save = type(server.tokenizer).save_pretrained

    def full_disk(self, directory, *a, **k):  # the tokenizer file written half, then ENOSPC
        save(self, directory, *a, **k)
        f = os.path.join(directory, "tokenizer.json")
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(server.tokenizer), "save_pretrained", full_disk)
    with pytest.raises(Exception):
        server._save(student)
    assert not server.weights_dir.exists(), "a half-written served student dir was left for the next run"
    monkeypatch.undo()
    _, rerun = _student_and_server(tiny_pair_dirs, tmp_path)  # the same command again
    rerun._save(student)
    AutoTokenizer.from_pretrained(rerun.weights_dir)
    AutoConfig.from_pretrained(rerun.weights_dir)
    assert (rerun.weights_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm_student"]  # no temporary left beside it
