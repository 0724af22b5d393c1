"""rollout.teacher_location=server: on-policy teacher scores from the vLLM teacher server, so the training
process never loads the teacher. Against the fake serving env (tests/fake_vllm.py: transformers behind vLLM's HTTP
API, on the tiny pair); make test-vllm compares the real vLLM (tests/test_vllm_engine.py)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from conftest import TINY
from fake_vllm import run_py

from distillspec import constants as C

SERVED = TINY + ["rollout=student", "rollout.engine=vllm", "rollout.teacher_location=server",
                 "rollout.cache_store=false"]


def _rollout(pad_id: int = 0):
    """A Rollout of 3 rows over the tiny vocabulary: prompts of 5, 3, 4 tokens (left-padded), completions of
    4, 1, 6 tokens (right-padded)."""
    from distillspec.lit.data import left_pad
    from distillspec.rollout.sequences import assemble

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 100, (n,), generator=g).tolist() for n in (5, 3, 4)]
    lengths = torch.tensor([4, 1, 6])
    comp = torch.randint(1, 100, (3, 6), generator=g)
    ids, mask = left_pad(prompts, pad_id)
    return assemble(ids, mask, comp, lengths, pad_id, "student")


def test_served_scores_of_a_rollout_equal_the_in_process_teacher_top_k(fake_python, tmp_path, tiny_pair_dirs):
    from transformers import AutoModelForCausalLM

    from distillspec.models.forward import completion_logits
    from distillspec.rollout.served_scores import ServedScores
    from distillspec.rollout.teacher_cache import SparseRollout, _topk
    from distillspec.serving.server import ManagedServer

    target, k = str(tiny_pair_dirs[1]), 8
    roll = _rollout()
    log = tmp_path / "vllm.log"
    with ManagedServer(target, python=fake_python, log=log) as client:
        served = ServedScores(client, k)(roll)
    assert log.read_text().count("completions request") == 1  # the whole batch in one request
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        vals, idx, tail = _topk(completion_logits(model, roll), k, 1.0)
    assert isinstance(served, SparseRollout) and torch.equal(served.input_ids, roll.input_ids)
    assert served.topk_idx.shape == (3, 6, k) and served.tail_logp.shape == (3, 6)
    mask = roll.completion_mask()
    assert torch.equal(served.topk_idx[mask], idx[mask])
    torch.testing.assert_close(served.topk_logp[mask], vals[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(served.tail_logp[mask], tail[mask], atol=1e-5, rtol=0)
    # past each row's length: zeros, as TeacherCache.rollout fills them
    assert not served.topk_idx[~mask].any() and not served.topk_logp[~mask].any() and not served.tail_logp[~mask].any()


def test_the_target_is_measured_in_a_child_process(tiny_pair_dirs):
    from transformers import AutoModelForCausalLM

    from distillspec.rollout.cache_store import model_fingerprint
    from distillspec.rollout.target_probe import describe_target

    target, seq = str(tiny_pair_dirs[1]), [5, 9, 17, 3, 42]
    card = describe_target(target, dtype="float32", quantization=None, device="cpu", probe_ids=seq)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1], -1)
    want = lp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(card.probe_logprobs), want, atol=1e-6, rtol=0)
    assert card.fingerprint == model_fingerprint(model)  # the teacher-data store key of an in-process teacher
    assert card.logits_dim == model.get_output_embeddings().weight.shape[0]


def _run(run_dir, *extra, env=None):
    return run_py(SERVED, run_dir, *extra, env=env)


def _loads(text: str, path: str) -> list[int]:
    """Line numbers of run.log's 'loaded <path>' lines (distillspec.models.loading.load_model)."""
    return [i for i, ln in enumerate(text.splitlines()) if re.search(rf"loaded {re.escape(path)} \(", ln)]


@pytest.mark.parametrize("stage", [C.STAGE_TRAIN, C.STAGE_TRAIN_EVAL])
def test_on_policy_training_never_loads_the_teacher(fake_python, tmp_path, stage):
    from distillspec.models.loading import resolve_model_path

    run_dir = tmp_path / "run"
    p = _run(run_dir, f"stage={stage}", f"rollout.vllm_python={fake_python}")
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((run_dir / C.METRICS_FILE).read_text())
    assert metrics["train"]["steps"] == 2 and (run_dir / "draft" / "config.json").is_file()
    text = (run_dir / "run.log").read_text()
    lines = text.splitlines()
    assert "teacher not loaded in this process" in text and "measured in child process" in text
    target, draft = resolve_model_path("tiny:target"), resolve_model_path("tiny:draft")
    assert _loads(text, draft), "the log names the models it loads"
    # the teacher server scored the training sequences: its probe, then one request per step (1 micro-batch)
    server_log = (run_dir / "vllm_logs" / "teacher-server.log").read_text()
    assert "completions request 3" in server_log and "completions request 4" not in server_log
    stopped = next(i for i, ln in enumerate(lines) if "stopped the vLLM server for" in ln and target in ln)
    if stage == C.STAGE_TRAIN:
        assert not _loads(text, target), "the target was loaded in the training process"
        return
    # train_eval: the target is loaded once, after training (its server is stopped by then), for both evaluations
    target_loads = _loads(text, target)
    assert len(target_loads) == 1 and target_loads[0] > stopped, "the target was loaded before training ended"
    untrained = next(i for i, ln in enumerate(lines) if "untrained draft:" in ln)
    assert untrained > target_loads[0] and len(_loads(text, draft)) == 2  # pair.draft reloaded for the comparison
    assert set(metrics["before"]) == {"metrics", "entropy_bins", "per_example"} and C.ALPHA_TOK in metrics["metrics"]
    assert (run_dir / "before_after.md").is_file()
    assert list(metrics["phase_seconds"]) == ["training", "target_load", "untrained_eval", "final_eval"]


def test_a_teacher_server_dying_mid_training_stops_the_run_and_a_rerun_resumes(fake_python, tmp_path):
    run_dir = tmp_path / "run"
    # teacher server: the probe is request 1, step 0's scores request 2; it dies at step 1's (3), after step 0's
    # checkpoint (the student server makes 2 requests in 2 steps: it does not reach its limit)
    p = _run(run_dir, "stage=train", f"rollout.vllm_python={fake_python}", env={"FAKE_VLLM_DIE_AFTER": "2"})
    assert p.returncode == C.EXIT_ENGINE_ERROR, p.stderr[-3000:]
    log = run_dir / "vllm_logs" / "teacher-server.log"
    err = p.stderr.strip().splitlines()[-1]
    assert "error: the vLLM server for" in err and str(log) in err and "fake engine died" in log.read_text()
    p = _run(run_dir, "stage=train", f"rollout.vllm_python={fake_python}")  # the same command again
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in (run_dir / "run.log").read_text()
    assert json.loads((run_dir / C.METRICS_FILE).read_text())["train"]["steps"] == 2


def test_what_needs_the_teacher_in_process_is_refused_at_once(tmp_path):
    cases = {("stage=train_eval", "train.eval_every=1"): "train.eval_every=1 with rollout.teacher_location=server",
             ("div=speckd",): "div.gate (the SpecKD gate: div=speckd)",
             ("div=adaptive",): "div.divergence='adaptive' needs the teacher's per-token entropy",
             ("div.block_weighting=block",): "div.block_weighting='block'"}
    for extra, want in cases.items():
        t0 = time.monotonic()
        p = _run(tmp_path / "x", *extra)
        err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        assert p.returncode == C.EXIT_CONFIG_ERROR and want in err, (extra, p.stderr[-2000:])
        assert "valid" in err and "rollout.teacher_location=process" in err
        assert time.monotonic() - t0 < 60
