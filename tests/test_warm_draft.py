"""The competent offline draft: offline:smollm2-135m-L4-warm is a training run of the project's own
recipe, cached like the other offline models and rebuilt when missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, compose_cfg

from distillspec.errors import ConfigError
from distillspec.models import warm
from distillspec.models.loading import check_model_name


def test_the_build_command_is_the_documented_recipe():
    """What the builder runs: the 4-layer offline draft, forward KL on cached teacher samples, 120 steps of 8
    of 192 prompts at nucleus T 0.6 (the offline_showcase fkl job that reached alpha_expected 0.626)."""
    cmd = warm.build_command(REPO / "work")
    assert cmd[1] == str(REPO / "run.py")
    cfg = compose_cfg([a for a in cmd[2:] if not a.startswith("hydra.")])
    assert cfg.stage == "train" and cfg.pair.target == "offline:smollm2-135m"
    assert cfg.pair.draft == warm.WARM_BASE != warm.WARM_DRAFT  # never built from itself
    assert cfg.div.divergence == "fkl" and cfg.rollout.source == "teacher" and cfg.rollout.cache_top_k == 64
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.num_train, cfg.train.lr) == (120, 8, 192, 1e-3)
    assert (cfg.sd.temperature, cfg.sd.top_p) == (0.6, 0.95)


def test_names():
    check_model_name(warm.WARM_DRAFT)
    with pytest.raises(ConfigError, match="L4-warm"):
        check_model_name("offline:smollm2-135m-L5-warm")
    from distillspec.models.shapes import config_for

    assert config_for(warm.WARM_DRAFT).num_hidden_layers == 4  # the planner knows it without building it


def test_build_caches_the_trained_draft_and_its_record(tmp_path, monkeypatch):
    """The builder's mechanism end to end, with the tiny pair standing in for the offline one: it runs the
    command, copies the run's draft/ into the cache atomically with warm_build.json, removes the work dir, and
    a second call returns the cached dir without training."""
    tiny = ["pair=tiny", "task.num_train=32", "train.max_steps=2", "train.batch_size=2", "train.num_train=4",
            "train.max_new_tokens=4", "train.checkpoint_every=1", "trainer=cpu"]
    monkeypatch.setattr(warm, "build_command", lambda work: [sys.executable, str(REPO / "run.py"), "stage=train",
                                                             *tiny, f"hydra.run.dir={work}"])
    out = warm.ensure_warm_draft(tmp_path)
    assert out == tmp_path / warm.WARM_DIRNAME
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer_config.json").is_file()
    record = json.loads((out / warm.BUILD_RECORD).read_text())
    assert record["model"] == warm.WARM_DRAFT and record["train"]["steps"] == 2
    assert not (tmp_path / f".{warm.WARM_DIRNAME}.work").exists()
    assert not list(tmp_path.glob(f".{warm.WARM_DIRNAME}.tmp-*"))

    def no_build(*a, **k):
        raise AssertionError("a cached warm draft was rebuilt")

    monkeypatch.setattr(subprocess, "run", no_build)
    monkeypatch.setattr(subprocess, "Popen", no_build)  # the builder's (warm.run_build)
    assert warm.ensure_warm_draft(tmp_path) == out


def test_a_failed_build_leaves_no_draft_and_says_where_the_log_is(tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "build_command", lambda work: [sys.executable, str(REPO / "run.py"), "pair=tiny",
                                                             "train.max_steps=-1", f"hydra.run.dir={work}"])
    with pytest.raises(RuntimeError, match="rerun to resume"):
        warm.ensure_warm_draft(tmp_path)
    assert not (tmp_path / warm.WARM_DIRNAME).exists()
