"""NaN/inf, underflowing temperatures and non-numeric values are refused by name;
training stops at the first non-finite loss or gradient and never saves a non-finite draft."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_cfg, run_cfg

from distillspec.errors import ConfigError, NonFiniteError
from distillspec.runner import build


@pytest.mark.parametrize("overrides, needle", [
    (["sd.temperature=nan"], "sd.temperature=nan"),
    (["sd.temperature=inf"], "sd.temperature=inf"),
    (["sd.temperature=1e-45"], "sd.temperature=1e-45"),
    (["sd.epsilon=nan"], "sd.epsilon=nan"),
    (["sd.top_p=nan"], "sd.top_p=nan"),
    (["sd.entropy_bin_max=inf"], "sd.entropy_bin_max=inf"),
    (["sd.gamma=abc"], "sd.gamma='abc'"),
    (["sd.gamma=2.5"], "sd.gamma=2.5"),
    (["sd.measure_speedup=maybe"], "sd.measure_speedup='maybe'"),
    (["div.temperature=nan"], "div.temperature=nan"),
    (["div.temperature=1e-45"], "div.temperature=1e-45"),
    (["div=jsd", "div.beta=nan"], "div.beta=nan"),
    (["div=speckd", "div.gate.beta=nan"], "div.gate.beta=nan"),
    (["rollout.temperature=nan"], "rollout.temperature=nan"),
    (["rollout.temperature=1e-45"], "rollout.temperature=1e-45"),
    (["rollout=mixed", "rollout.mix.student=nan"], "rollout.mix.student=nan"),
    (["train.lr=abc"], "train.lr='abc'"),
    (["train.lr=nan"], "train.lr=nan"),
    (["train.lr=inf"], "train.lr=inf"),
    (["train.max_steps=abc"], "train.max_steps='abc'"),
    (["train.weight_decay=nan"], "train.weight_decay=nan"),
    (["train.grad_clip=inf"], "train.grad_clip=inf"),
])
def test_non_finite_and_non_numeric_settings_are_refused(overrides, needle):
    cfg = compose_cfg(overrides)
    group = overrides[-1].split(".")[0]
    with pytest.raises(ConfigError) as exc:
        build(cfg[group], group)
    assert needle in str(exc.value)


def test_good_values_still_pass_and_ints_become_floats():
    cfg = compose_cfg(["train.lr=1", "sd.temperature=0", "rollout.temperature=0.001"])
    assert build(cfg.train, "train").lr == 1.0 and isinstance(build(cfg.train, "train").lr, float)
    assert build(cfg.sd, "sd").greedy
    assert build(cfg.rollout, "rollout").temperature == 0.001


def test_bad_seed_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="seed='x'"):
        run_cfg(TINY + ["seed=x"], tmp_path)


def test_specs_refuse_nan_temperature():
    """The SD engine's temperatures come from these specs (the engine checks shapes only)."""
    from distillspec.defaults import build_spec
    from distillspec.specs import RolloutSpec, SDSpec

    for spec in (SDSpec, RolloutSpec):
        for t in (float("nan"), 1e-45, float("inf")):
            with pytest.raises(ConfigError, match="temperature"):
                build_spec(spec, temperature=t)


def test_finite_check_names_loss_and_gradient():
    from distillspec.lit.guards import check_finite_step

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    check_finite_step(torch.tensor(1.0), [w], 0)  # finite: no error
    with pytest.raises(NonFiniteError, match="non-finite loss at training step 4"):
        check_finite_step(torch.tensor(float("nan")), [w], 4)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(NonFiniteError, match="non-finite gradient at training step 2"):
        check_finite_step(torch.tensor(1.0), [w], 2)


def test_training_stops_at_first_nan_loss_and_saves_no_draft(tmp_path, monkeypatch):
    import distillspec.lit.train_module as tm

    real = tm.divergence_loss
    calls = []

    def nan_from_second_step(*args, **kwargs):
        loss, per_tok = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), per_tok) if len(calls) > 1 else (loss, per_tok)

    monkeypatch.setattr(tm, "divergence_loss", nan_from_second_step)
    with pytest.raises(NonFiniteError, match="step 1"):
        run_cfg(TINY + ["stage=train", "train.max_steps=3", "train.batch_size=4", "rollout=student"], tmp_path)
    assert not (tmp_path / "draft").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_save_refuses_non_finite_draft(tmp_path, tiny_pair_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillspec.lit.train_module import save_hf_atomic

    m = AutoModelForCausalLM.from_pretrained(tiny_pair_dirs[0])
    with torch.no_grad():
        next(m.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        save_hf_atomic(m, AutoTokenizer.from_pretrained(tiny_pair_dirs[0]), tmp_path / "draft")
    assert not (tmp_path / "draft").exists()


@pytest.mark.parametrize("over, match", [
    (["sd.kv=paged"], r"sd.kv 'paged'; valid choices: dynamic, static"),
    (["sd.compile=true"], r"sd.compile=true needs sd.kv=static"),
])
def test_bad_kv_options_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        build(compose_cfg(over).sd, "sd")


@pytest.mark.parametrize("lr, clip", [("1e10", "1.0"), ("1e30", "0")])
def test_blown_up_update_stops_and_saves_no_draft(tmp_path, lr, clip):
    """lr=1e10 can leave both logged losses finite while the last update makes the draft's outputs NaN, and
    lr=1e30 with grad_clip=0 gives a draft with |w| = 1e30 and finite outputs. The first update that grows the
    trained weights' norm past
    WEIGHT_GROWTH_LIMIT x stops the run (NonFiniteError, run.py: exit 3) before it is checkpointed: no draft, no
    metrics, no checkpoint. (Step 0 trains at lr / warmup_steps, so the blow-up comes at step 0.)"""
    from distillspec import constants as C

    over = [f"train.lr={lr}", f"train.grad_clip={clip}", "train.max_steps=2", "train.batch_size=2",
            "train.num_train=4", "sd.num_eval=2", "sd.max_new_tokens=4", "sd.measure_speedup=false",
            "sd.draft_quality=false"]
    with pytest.raises(NonFiniteError, match=r"update of training step 0 blew up the draft's weights.*largest "
                                             r"\|weight\| [0-9.e+]+; lr of the step [0-9.e+]+\).*Lower train.lr"):
        run_cfg(TINY + over, tmp_path)
    assert not (tmp_path / "draft").exists() and not (tmp_path / C.METRICS_FILE).exists()
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_weight_growth_check_warns_then_stops(caplog):
    from distillspec.lit.guards import WEIGHT_GROWTH_LIMIT, WEIGHT_GROWTH_WARN, check_weight_growth

    w = torch.nn.Parameter(torch.ones(4))  # norm 2
    assert check_weight_growth([w], 2.0, 0, 1e-3) is False  # unchanged: silent
    with torch.no_grad():
        w.mul_(WEIGHT_GROWTH_WARN * 2)
    with caplog.at_level("WARNING", logger="distillspec.lit.guards"):
        assert check_weight_growth([w], 2.0, 3, 0.5) is True
        assert check_weight_growth([w], 2.0, 4, 0.5, warned=True) is True  # once
    assert [r.getMessage() for r in caplog.records if "grown 20 x" in r.getMessage()] != []
    assert sum("norm has grown" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        w.fill_(WEIGHT_GROWTH_LIMIT * 1.5)  # norm 3e3: 1.5e3 x
    with pytest.raises(NonFiniteError, match=r"training step 5 blew up.*1.5e\+03 x its 2 .*\|weight\| 1.5e\+03"):
        check_weight_growth([w], 2.0, 5, 7.0)
    with torch.no_grad():
        w.fill_(1e30)  # finite weights whose float32 norm overflows
    with pytest.raises(NonFiniteError, match=r"norm is beyond float32's range, vs its 2 .*largest \|weight\| 1e\+30; "
                                             r"lr of the step 1e\+30"):
        check_weight_growth([w], 2.0, 0, 1e30)
    with torch.no_grad():
        w.fill_(float("nan"))  # left to check_finite_update / check_finite_step, which name the parameter
    assert check_weight_growth([w], 2.0, 0, 1.0) is False


def test_lr_schedule_trains_from_step_0():
    """With warm-up, step 0 trains at lr / warmup_steps, never at 0 (transformers' schedule starts its ramp at 0)."""
    import math

    from distillspec.lit.train_module import lr_factor

    assert [round(lr_factor(s, 3, 40), 4) for s in range(4)] == [0.3333, 0.6667, 1.0, 0.9983]
    assert all(lr_factor(s, w, t) > 0 for t in (1, 2, 5, 40) for w in (0, 1, 3, 50) for s in range(t))
    assert lr_factor(0, 3, 1) == pytest.approx(1 / 3)  # max_steps=1 with warm-up still trains
    for s in range(10):  # no warm-up: the cosine decay of transformers' schedule, unchanged
        assert lr_factor(s, 0, 10) == lr_factor(s, 1, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / 10)))


def test_one_step_with_warmup_changes_the_draft_and_logs_the_lr_it_used(tmp_path):
    """`train.max_steps=1` (warm-up 3) trains once, at lr / 3: the saved draft differs from the untrained one, and
    train/lr is the lr of the step it is logged at."""
    import csv
    from pathlib import Path

    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from distillspec import constants as C

    used = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        run_cfg(TINY + ["stage=train", "train.max_steps=2", "train.warmup_steps=3", "train.lr=0.01"], tmp_path)
    finally:
        handle.remove()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    logged = [float(r[C.TRAIN_LR]) for r in rows if r.get(C.TRAIN_LR)]
    assert used == pytest.approx([0.01 / 3, 0.02 / 3]) and logged == pytest.approx(used)
    one = tmp_path / "one"
    run_cfg(TINY + ["stage=train", "train.max_steps=1", "train.warmup_steps=3"], one)
    from distillspec.models.loading import resolve_model_path

    untrained = Path(resolve_model_path("tiny:draft")) / "model.safetensors"
    before, after = load_file(untrained), load_file(one / "draft" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_finite_update_check_names_a_non_finite_parameter():
    from distillspec.lit.guards import check_finite_update

    model = torch.nn.Linear(3, 2)
    check_finite_update(model, lambda: torch.ones(1), 4)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"update of training step 4 .*parameter bias"):
        check_finite_update(model, lambda: torch.ones(1), 4)
    model.bias.data.zero_()
    with pytest.raises(NonFiniteError, match=r"update of training step 4 .*outputs"):
        check_finite_update(model, lambda: torch.tensor([float("nan")]), 4)


@pytest.mark.parametrize("overrides, match", [
    (["rollout.mix.student=1.5"], r"rollout.mix=\{'fixed': 0.0, 'student': 1.5, 'teacher': 0.5\}.*sum 2"),
    (["rollout.mix.student=0.3"], r"'student': 0.3.*sum 0.8"),
    (["rollout.mix.fixed=-0.5", "rollout.mix.student=1.0"], r"'fixed': -0.5"),
])
def test_mixed_rollout_weights_must_be_fractions_summing_to_one(overrides, match):
    """rollout.mix.student=1.5 is refused (normalising it would silently run 0.75 / 0.25)."""
    cfg = compose_cfg(["rollout=mixed", *overrides])
    with pytest.raises(ConfigError, match=match) as exc:
        build(cfg.rollout, "rollout")
    assert "within 1e-06 of 1" in str(exc.value)


def test_mixed_rollout_fractions_pass_unchanged():
    cfg = compose_cfg(["rollout=mixed", "rollout.mix.student=0.75", "rollout.mix.teacher=0.25"])
    assert build(cfg.rollout, "rollout").mix == {"fixed": 0.0, "student": 0.75, "teacher": 0.25}
