"""train.release_target and train.curve=heldout (distillspec.teacherless, distillspec.heldout) on the tiny pair:
the training process drops the target once the teacher data is made, and the run's numbers are those of a run that
held it; with the data stored the target is never loaded here before training; the held-out curve needs no SD."""

from __future__ import annotations

import pytest
from conftest import TINY, run_cfg

from distillspec import constants as C
from distillspec.errors import ConfigError

RUN = TINY + ["rollout=teacher", "stage=train_eval", "train.eval_every=1", "sd.temperature=1.0"]
KEYS = (C.ALPHA_TOK, C.ALPHA_EXPECTED, C.NUM_OUTPUT_TOKENS)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLSPEC_TEACHER_DATA", str(tmp_path / "store"))
    return tmp_path / "store"


def watch_fit(monkeypatch) -> list:
    """Record (teacher, cached sources) of every DistillModule as its fit starts."""
    from distillspec.lit.train_module import DistillModule

    seen, original = [], DistillModule.on_fit_start

    def on_fit_start(self):
        seen.append((self.teacher, sorted(self.sampler.caches)))
        original(self)

    monkeypatch.setattr(DistillModule, "on_fit_start", on_fit_start)
    return seen


def pick(metrics: dict) -> dict:
    return {k: metrics[k] for k in KEYS}


def test_released_target_gives_the_same_run_without_the_target_in_training(tmp_path, store, monkeypatch):
    seen = watch_fit(monkeypatch)
    held = run_cfg(RUN, tmp_path / "held")
    released = run_cfg(RUN + ["train.release_target=true"], tmp_path / "released")
    assert seen[0][0] is not None and seen[1] == (None, ["teacher"])  # released: no teacher, its data made before
    assert pick(released["metrics"]) == pick(held["metrics"])
    assert pick(released["before"]["metrics"]) == pick(held["before"]["metrics"])
    curve = [{k: p[C.VAL_PREFIX + k] for k in KEYS} | {"step": p["step"]} for p in released["train"]["eval_history"]]
    assert curve == [{k: p[C.VAL_PREFIX + k] for k in KEYS} | {"step": p["step"]}
                     for p in held["train"]["eval_history"]]
    assert list(released["phase_seconds"]) == ["teacher_data", "training", "target_load", "untrained_eval", "final_eval"]

    from distillspec import teacherless

    def refuse(self):
        raise AssertionError("the target was loaded although its teacher data is stored")

    monkeypatch.setattr(teacherless.TargetLoader, "__call__", refuse)  # the store has the data now
    again = run_cfg(RUN + ["train.release_target=true", "stage=train", "train.eval_every=0"], tmp_path / "again")
    assert again["train"]["steps"] == 2


def test_heldout_curve(tmp_path, store, monkeypatch, caplog):
    import logging

    from distillspec import teacherless

    loads = []
    original = teacherless.target_models
    monkeypatch.setattr(teacherless, "target_models", lambda *a, **kw: loads.append(1) or original(*a, **kw))
    with caplog.at_level(logging.INFO):
        out = run_cfg(RUN + ["stage=train", "train.curve=heldout", "train.release_target=true"], tmp_path / "run")
    curve = out["train"]["eval_history"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    alphas = [p[C.VAL_PREFIX + C.ALPHA_HELDOUT] for p in curve]
    assert all(0.0 <= a <= 1.0 for a in alphas) and alphas[0] != alphas[-1]
    assert all(p[C.VAL_PREFIX + C.ALPHA_HELDOUT_LO] <= a <= p[C.VAL_PREFIX + C.ALPHA_HELDOUT_HI]
               for p, a in zip(curve, alphas))
    assert len(loads) == 1  # once, for the teacher data and the held-out samples together; never for the curve
    # each point's log line names what was measured, with its value
    assert f"step 2: {C.ALPHA_HELDOUT}={alphas[-1]:.4f}" in caplog.text
    assert "held-out acceptance @ step 2" in caplog.text and "nan" not in caplog.text


@pytest.mark.parametrize("extra, needle", [
    (["rollout=student"], "rollout source(s) student are made during training"),
    (["rollout.cache_top_k=0"], "rollout.cache_top_k=0 turns the teacher data off"),
    (["div=adaptive"], "div.divergence='adaptive' needs the teacher's per-token entropy"),
    (["train.curve=nope"], "unknown train.curve 'nope'; valid choices: sd, heldout"),
])
def test_what_needs_the_target_in_training_is_refused(tmp_path, extra, needle, monkeypatch):
    from distillspec import runner

    monkeypatch.setattr(runner, "load_data", lambda s: pytest.fail("data loaded before the configuration error"))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        run_cfg(RUN + ["train.release_target=true"] + extra, tmp_path / "x")


def test_freed_memory_goes_back_before_the_target_loads(tmp_path, store, monkeypatch):
    """A released run hands freed memory back to the OS when it drops the teacher data's target, and again after
    training before it loads the target for its SD evaluation; the trained draft then holds no gradients (each
    step clears them)."""
    from distillspec import teacherless

    events, make_target, load_target = [], teacherless.target_models, teacherless.load_target

    def watched_target_models(pair, device, verifier=True):
        events.append("target")
        return make_target(pair, device, verifier)

    def watched_load_target(pair, models, device):
        events.append(f"grads={sum(p.grad is not None for p in models.draft.parameters())}")
        return load_target(pair, models, device)

    monkeypatch.setattr(teacherless, "release_freed", lambda: events.append("trim") or True)
    monkeypatch.setattr(teacherless, "target_models", watched_target_models)
    monkeypatch.setattr(teacherless, "load_target", watched_load_target)
    run_cfg(RUN + ["train.release_target=true", "train.eval_every=0"], tmp_path / "run")
    # the teacher data's target, released; after training: no gradients, freed memory returned, then the target
    assert events == ["target", "trim", "grads=0", "trim", "target"]
