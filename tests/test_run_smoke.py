"""End-to-end runs of the real config on the tiny pair: train+eval, eval-only, every divergence and
rollout source, kill-and-resume, DDP on 2 CPU processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cfg

from distillspec import constants as C


def test_train_eval_writes_metrics(tmp_path):
    out = run_cfg(TINY + ["train.eval_every=1", "train.eval_num=2"], tmp_path)
    saved = json.loads((tmp_path / C.METRICS_FILE).read_text())
    m = saved["metrics"]
    for key in (C.ALPHA_TOK, C.ALPHA_SEQ, C.BLOCK_EFFICIENCY, C.MEAN_ACCEPTED_LEN, C.ALPHA_EXPECTED,
                C.SPEEDUP, C.SPEEDUP_PREDICTED, C.COST_RATIO):
        assert key in m, key
    assert 0.0 <= m[C.ALPHA_TOK] <= 1.0
    assert 1.0 <= m[C.BLOCK_EFFICIENCY] <= 4.0  # gamma = 3
    assert saved["train"]["steps"] == 2
    assert (tmp_path / "draft" / "config.json").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()
    assert out["metrics"] == m
    # wall time per phase of the launch, in order (the demo prints them at the end)
    assert list(saved["phase_seconds"]) == ["untrained_eval", "training", "final_eval"]
    assert all(v >= 0 for v in saved["phase_seconds"].values())
    if saved[C.PEAK_RSS_GIB] is not None:  # and its peak memory, the run's peak being the highest
        assert list(saved[C.PHASE_PEAK_RSS_GIB]) == list(saved["phase_seconds"])
        assert max(saved[C.PHASE_PEAK_RSS_GIB].values()) <= saved[C.PEAK_RSS_GIB]
    # the final SD evaluation's row is at the final training step
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        final_rows = [r for r in csv.DictReader(f) if r.get(C.ALPHA_TOK)]
    assert [int(float(r["step"])) for r in final_rows] == [2]
    curve = saved["train"]["eval_history"]  # periodic SD eval: before training and after each step
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert all(0.0 <= p[C.VAL_PREFIX + C.ALPHA_TOK] <= 1.0 for p in curve)
    # Before/after: the untrained draft on the same prompts, a table with CIs and a PNG (compare_untrained).
    before = saved["before"]
    assert len(before["per_example"]) == len(json.loads((tmp_path / "per_example.json").read_text()))
    assert 0.0 <= before["metrics"][C.ALPHA_EXPECTED] <= 1.0
    assert C.SPEEDUP not in before["metrics"] and C.SPEEDUP in m  # the untrained draft is not timed
    table = (tmp_path / "before_after.md").read_text()
    assert "untrained draft" in table and "α_expected" in table and table.count("[") >= 8
    assert (tmp_path / "before_after.png").stat().st_size > 10_000


def test_curve_ends_are_the_before_and_after_evaluations(tmp_path, caplog):
    """When the curve's prompts are all the eval prompts, the untrained and final evaluations are its first and
    last points: neither is measured twice."""
    with caplog.at_level("INFO", logger="distillspec"):
        run_cfg(TINY + ["train.eval_every=1", "train.eval_num=4"], tmp_path)  # sd.num_eval=4
    saved = json.loads((tmp_path / C.METRICS_FILE).read_text())
    curve = saved["train"]["eval_history"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    for point, source in ((curve[0], saved["before"]["metrics"]), (curve[-1], saved["metrics"])):
        assert {k: point[C.VAL_PREFIX + k] for k in source} == pytest.approx(source)
    periodic = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split(":")[0] for m in periodic] == ["step 1"]  # the only evaluation made during training


def test_stage_eval_of_trained_draft(tmp_path):
    run_cfg(TINY + ["stage=train"], tmp_path / "train")
    saved = json.loads((tmp_path / "train" / C.METRICS_FILE).read_text())
    assert "metrics" not in saved
    out = run_cfg(TINY + ["stage=eval", f"draft_checkpoint={tmp_path / 'train' / 'draft'}"], tmp_path / "eval")
    assert out["draft"] == str(tmp_path / "train" / "draft")
    assert C.ALPHA_TOK in out["metrics"]
    assert C.TRAINED_BY not in out  # the training run has no .hydra/config.yaml: no label to keep


def test_an_evaluated_trained_draft_keeps_its_training_label_without_the_training_run(tmp_path):
    """stage=eval draft_checkpoint=<run>/draft records the training run's report label and starting draft in its
    metrics.json, so the report names the row after the training even once <run> is gone (an archived copy)."""
    import shutil

    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from distillspec.report_jobs import collect

    train = tmp_path / "train"
    run_cfg(TINY + ["stage=train", "div=rkl"], train)
    (train / ".hydra").mkdir()
    OmegaConf.save(compose_cfg(TINY + ["stage=train", "div=rkl"]), train / ".hydra" / "config.yaml")  # as Hydra does
    sweep = tmp_path / "sweep"
    out = run_cfg(TINY + ["stage=eval", f"draft_checkpoint={train / 'draft'}"], sweep / "0_trained")
    run_cfg(TINY + ["stage=eval"], sweep / "1_untrained")
    untrained = json.loads((sweep / "1_untrained" / C.METRICS_FILE).read_text())["draft"]
    assert out[C.TRAINED_BY] == {"method": "rkl/teacher", "draft": untrained}
    shutil.rmtree(train)
    rows = collect(sweep).set_index("method")
    assert sorted(rows.index) == ["baseline", "rkl/teacher"] and rows.loc["rkl/teacher", "draft"] == untrained


def test_each_job_reports_its_own_peak_memory(tmp_path):
    """metrics.json's peak RSS is the job's: 1 GiB touched earlier in the same process (an earlier job of a
    multirun) is not counted, because each run resets the peak at its start."""
    import numpy as np

    from distillspec.memory import peak_rss_bytes

    big = np.ones(2**30, dtype=np.uint8)
    del big
    before = peak_rss_bytes()
    out = run_cfg(TINY + ["stage=eval", "sd.measure_speedup=false"], tmp_path)
    saved = json.loads((tmp_path / C.METRICS_FILE).read_text())
    assert saved[C.PEAK_RSS_GIB] == out[C.PEAK_RSS_GIB]
    if before is None:  # no /proc: nothing measured
        assert out[C.PEAK_RSS_GIB] is None
        return
    assert before > 2**30 and 0 < out[C.PEAK_RSS_GIB] * 2**30 < before - 2**29


def test_a_phase_peak_is_the_phase_own():
    """PhaseClock: 1 GiB touched in one phase is that phase's peak, not the next one's; the run's peak keeps it."""
    import numpy as np

    from distillspec.memory import peak_rss_bytes
    from distillspec.run_phases import PhaseClock

    if peak_rss_bytes() is None:
        pytest.skip("no /proc: nothing measured")
    clock = PhaseClock()
    big = np.ones(2**30, dtype=np.uint8)
    del big
    clock.done("big")
    clock.done("small")
    assert clock.peak_gib["big"] > 1.0 and clock.peak_gib["small"] < clock.peak_gib["big"] - 0.5
    assert clock.run_peak_bytes() >= 2**30


def test_a_finished_run_can_drop_its_checkpoints(tmp_path):
    """train.keep_checkpoints=false: checkpoints/ is gone once metrics.json is written, draft/ stays, and the
    rerun reports the finished result; the default keeps them."""
    kept = tmp_path / "kept"
    run_cfg(TINY + ["stage=train"], kept)
    assert (kept / "checkpoints" / "last.ckpt").exists()
    run = tmp_path / "dropped"
    first = run_cfg(TINY + ["stage=train", "train.keep_checkpoints=false"], run)
    assert not (run / "checkpoints").exists()
    assert (run / "draft" / "config.json").exists() and (run / C.METRICS_FILE).exists()
    assert run_cfg(TINY + ["stage=train", "train.keep_checkpoints=false"], run) == first


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "speckd", "adaptive"])
def test_every_divergence_trains(tmp_path, div):
    out = run_cfg(TINY + [f"div={div}", "stage=train", "train.max_steps=1"], tmp_path)
    assert out["train"]["steps"] == 1


@pytest.mark.parametrize("rollout", ["fixed", "student", "teacher", "mixed", "skd"])
def test_every_rollout_source_trains(tmp_path, rollout):
    out = run_cfg(TINY + [f"rollout={rollout}", "stage=train", "train.max_steps=1"], tmp_path)
    assert out["train"]["steps"] == 1


def _draft_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "draft" / "model.safetensors"))


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    args = TINY + ["train.max_steps=6", "train.checkpoint_every=1", "trainer.accelerator=cpu",
                   "train.eval_every=2", "train.eval_num=2"]  # train_eval: periodic evals need eval prompts
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={killed}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint appeared before the kill"
    assert not (killed / "draft").exists(), "the run finished before it was killed; the test proves nothing"
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= step < 6
    resumed = run_cfg(args, killed)
    assert resumed["train"]["resumed_from"] is not None
    assert resumed["train"]["steps"] == 6
    straight = run_cfg(args, tmp_path / "straight")
    assert straight["train"]["resumed_from"] is None
    a, b = _draft_state(killed), _draft_state(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # The acceptance curve survives the kill: points from before it come back from the checkpoint.
    curve = lambda out: [(p["step"], p[C.VAL_PREFIX + C.ALPHA_TOK]) for p in out["train"]["eval_history"]]  # noqa: E731
    assert [s for s, _ in curve(straight)] == [0, 2, 4, 6]
    assert curve(resumed) == curve(straight)


def test_ddp_cpu_two_processes(tmp_path):
    args = [a for a in TINY if not a.startswith("trainer=")] + ["trainer=ddp_cpu", "train.max_steps=2"]
    out = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((tmp_path / C.METRICS_FILE).read_text())
    assert saved["train"]["steps"] == 2 and C.ALPHA_TOK in saved["metrics"]


@pytest.mark.parametrize("exp", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_experiment_files_smoke(tmp_path, exp):
    """Every experiment file composes and runs one job, shrunk to the tiny pair."""
    out = run_cfg([f"experiment={exp}"] + TINY + ["train.max_steps=1", "pair.target_quantization=null",
                                                  "pair.verify_full_precision=false"], tmp_path)  # needs quantization
    assert C.METRICS_FILE in os.listdir(tmp_path)
    assert out["stage"] in C.STAGES


def test_freeze_embeddings_trains_layers_only(tmp_path):
    from safetensors.torch import load_file

    from distillspec.models.loading import resolve_model_path

    run_cfg(TINY + ["stage=train", "train.freeze_embeddings=true", "rollout=teacher"], tmp_path)
    trained = _draft_state(tmp_path)
    initial = load_file(str(Path(resolve_model_path("tiny:draft")) / "model.safetensors"))
    assert torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    changed = [k for k in trained if k.startswith("model.layers.") and not torch.equal(trained[k], initial[k])]
    assert changed


def test_static_kv_evaluation_equals_the_dynamic_one(tmp_path):
    """sd.kv=static through the real config: the same SD outputs and acceptance as the default dynamic cache."""
    over = TINY + ["stage=eval", "sd.measure_speedup=false", "sd.draft_quality=false"]
    dyn = run_cfg(over, tmp_path / "dynamic")
    sta = run_cfg(over + ["sd.kv=static"], tmp_path / "static")
    for key in (C.ALPHA_TOK, C.ALPHA_SEQ, C.BLOCK_EFFICIENCY):  # counts of the same accept/reject decisions
        assert sta["metrics"][key] == dyn["metrics"][key], key
    # mean of min(1, p/q): the same positions, float32 probabilities from differently shaped attention calls
    assert sta["metrics"][C.ALPHA_EXPECTED] == pytest.approx(dyn["metrics"][C.ALPHA_EXPECTED], abs=1e-6)
    outputs = [json.loads((tmp_path / d / "per_example.json").read_text()) for d in ("dynamic", "static")]
    fields = ("uid", "num_accepted", "num_drafted", "num_output_tokens", "num_blocks")
    assert [[e[f] for f in fields] for e in outputs[0]] == [[e[f] for f in fields] for e in outputs[1]]
