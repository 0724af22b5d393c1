"""The real Hydra config composes, every group resolves, and bad input fails early and clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CONF_DIR, REPO, TINY, compose_cfg

from distillspec.errors import ConfigError
from distillspec.runner import build

GROUPS = ["task", "pair", "div", "rollout", "sd", "trainer", "logger"]


def test_default_config_has_all_groups():
    cfg = compose_cfg()
    for g in GROUPS + ["train"]:
        assert g in cfg, g
    assert cfg.stage == "train_eval"
    choices = cfg.hydra.runtime.choices
    assert choices.task == "arithmetic" and choices.pair == "offline" and choices.div == "fkl"


@pytest.mark.parametrize("group", ["task", "pair", "div", "rollout", "sd", "trainer", "logger"])
def test_every_option_composes(group):
    for f in sorted((CONF_DIR / group).glob("*.yaml")):
        cfg = compose_cfg([f"{group}={f.stem}"])
        assert cfg[group] is not None


@pytest.mark.parametrize("group", ["div", "rollout", "sd"])
def test_every_spec_instantiates(group):
    for f in sorted((CONF_DIR / group).glob("*.yaml")):
        cfg = compose_cfg([f"{group}={f.stem}"])
        spec = build(cfg[group], group)
        assert type(spec).__name__.endswith("Spec")


def test_cli_cfg_job_shows_groups():
    out = subprocess.run([sys.executable, "run.py", "--cfg", "job"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for g in GROUPS:
        assert f"\n{g}:" in "\n" + out.stdout, g


def test_unknown_group_option_lists_choices():
    out = subprocess.run([sys.executable, "run.py", "div=nope", "--cfg", "job"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "nope" in out.stderr and "fkl" in out.stderr and "rkl" in out.stderr


@pytest.mark.parametrize("override, needle", [
    ("sd.gamma=0", "sd.gamma=0"),
    ("sd.temperature=-0.5", "sd.temperature"),
    ("sd.top_p=0", "sd.top_p"),
    ("sd.top_p=1.5", "sd.top_p"),
    ("sd.lenience=huge", "huge"),
    ("sd.entropy_bin_max=0", "sd.entropy_bin_max=0"),
    ("div.divergence=kl2", "kl2"),
    ("rollout.source=web", "web"),
    ("train.max_steps=0", "train.max_steps"),
])
def test_bad_values_fail_with_clear_message(override, needle):
    cfg = compose_cfg([override])
    group = override.split(".")[0]
    with pytest.raises(ConfigError) as exc:
        build(cfg[group], group)
    assert needle in str(exc.value)


def test_bad_stage_fails(tmp_path):
    from conftest import run_cfg

    with pytest.raises(ConfigError, match="stage"):
        run_cfg(TINY + ["stage=deploy"], tmp_path)


def test_run_py_reports_config_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "run.py", *TINY, "sd.gamma=0", f"hydra.run.dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "sd.gamma=0" in out.stderr and "Traceback" not in out.stderr


def test_long_override_dirnames_are_shortened_stably():
    from distillspec.resolvers import MAX_DIRNAME, short_dirname

    a, b = "x=1," * 60 + "y=1", "x=1," * 60 + "y=2"
    assert short_dirname("div-rkl+sd.gamma-3") == "div-rkl+sd.gamma-3"
    # pasteable: nothing a shell or Hydra's override grammar treats specially
    assert short_dirname("pair.draft-offline:smollm2 L4,x=1/y") == "pair.draft-offline_smollm2_L4_x_1_y"
    assert len(short_dirname(a)) <= MAX_DIRNAME and short_dirname(a) != short_dirname(b)
    assert short_dirname(a) == short_dirname(a)


def test_default_name_resolves_outside_a_job():
    """The multirun launcher resolves hydra.sweep.dir before any job's HydraConfig exists."""
    from conftest import compose_cfg
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg = compose_cfg(["task=gsm8k_local", "pair=tiny"])
    HydraConfig.instance().cfg = None  # as in the launcher's process before the first job
    assert str(cfg.hydra.sweep.dir) == "multirun/gsm8k_local-tiny"
    assert OmegaConf.select(cfg, "name") == "gsm8k_local-tiny"


def test_slurm_launcher_composes():
    from conftest import compose_cfg

    cfg = compose_cfg(["experiment=reference_qwen_gsm8k", "hydra/launcher=slurm"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_run_name_uses_model_names_when_the_pair_is_given_by_paths_or_ids():
    from conftest import compose_cfg
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    given = ["task=gsm8k_local", "pair.target=/models/SmolLM2-1.7B-Instruct/",
             "pair.draft=HuggingFaceTB/SmolLM2-135M-Instruct"]
    cfg = compose_cfg(given)
    expected = "gsm8k_local-SmolLM2-1.7B-Instruct+SmolLM2-135M-Instruct"
    assert OmegaConf.select(cfg, "name") == expected
    assert str(cfg.hydra.sweep.dir) == f"multirun/{expected}"
    HydraConfig.instance().cfg = None  # as before any job exists: read from the config's own hydra node
    assert OmegaConf.select(cfg, "name") == expected
    one = compose_cfg(["pair=tiny", "pair.draft=offline:smollm2-135m-L6"])  # the other model: the group's value
    assert OmegaConf.select(one, "name") == "arithmetic-target+smollm2-135m-L6"
    assert OmegaConf.select(compose_cfg(["pair=tiny"]), "name") == "arithmetic-tiny"


@pytest.mark.parametrize("rollout", ["fixed", "student", "teacher", "mixed", "skd"])
def test_cache_top_k_is_in_every_rollout_config(rollout):
    """rollout.cache_top_k is overridable without '+' for every rollout option."""
    assert compose_cfg([f"rollout={rollout}"]).rollout.cache_top_k == 64  # the top-64 sparse teacher
    assert build(compose_cfg([f"rollout={rollout}", "rollout.cache_top_k=32"]).rollout, "rollout").cache_top_k == 32


@pytest.mark.parametrize("rollout", ["fixed", "student", "teacher", "skd"])
def test_mix_on_a_non_mixed_source_is_refused(rollout):
    """rollout.mix.* with a non-mixed source is refused, not ignored (even student=0.9 teacher=0.9)."""
    cfg = compose_cfg([f"rollout={rollout}", "+rollout.mix.student=0.9", "+rollout.mix.teacher=0.9"])
    with pytest.raises(ConfigError, match=rf"rollout.mix=\{{'student': 0.9, 'teacher': 0.9\}} is set but "
                                          rf"rollout.source='{rollout}'; the mix applies only to rollout.source=mixed"):
        build(cfg.rollout, "rollout")
    mixed = compose_cfg(["rollout=mixed", "rollout.source=student"])  # the mixed config's weights, another source
    with pytest.raises(ConfigError, match="is set but rollout.source='student'"):
        build(mixed.rollout, "rollout")


def _settable(cls) -> set[str]:
    """The keyword parameters a config node of `_target_: cls` may set (dataclass fields, or every keyword of the
    __init__ methods along the class's MRO)."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if n != "self" and p.kind is p.KEYWORD_ONLY}
    return names


@pytest.mark.parametrize("group", ["task", "pair", "div", "rollout", "sd"])
def test_every_setting_is_in_the_yaml(group):
    """The YAML is the one source of settings: every option of a group holds every field its `_target_` takes, so
    each is overridable without `+` (a field added to a spec fails here until its YAML names it)."""
    from hydra.utils import get_class

    for f in sorted((CONF_DIR / group).glob("*.yaml")):
        node = compose_cfg([f"{group}={f.stem}"])[group]
        missing = sorted(_settable(get_class(node._target_)) - set(node))
        assert not missing, f"conf/{group}/{f.stem}.yaml (with conf/config.yaml's {group}:) lacks {missing}"
    train = compose_cfg().train
    from distillspec.specs import TrainSpec

    assert not sorted(_settable(TrainSpec) - set(train)), "conf/config.yaml's train: lacks TrainSpec fields"


def test_the_specs_hold_no_defaults_of_their_own():
    """The YAML is the one source of defaults: no field of a spec dataclass has a default, so a run's values and a
    test's or benchmark's (distillspec.defaults.build_spec) can only come from conf/."""
    import dataclasses

    from distillspec.models.loading import PairSpec
    from distillspec.specs import GateSpec, ObjectiveSpec, RolloutSpec, SDSpec, TrainSpec

    for cls in (SDSpec, GateSpec, ObjectiveSpec, RolloutSpec, TrainSpec, PairSpec):
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not with_default, f"{cls.__name__} has defaults of its own for {with_default}; put them in conf/"


def test_build_spec_takes_the_yaml_defaults():
    """build_spec gives the spec a run without overrides gets, changed only where it is told."""
    from distillspec.defaults import build_spec
    from distillspec.specs import GateSpec, SDSpec, TrainSpec

    cfg = compose_cfg()
    assert build_spec(SDSpec) == build(cfg.sd, "sd")
    assert build_spec(TrainSpec, lr=0.5) == build(cfg.train, "train").__class__(
        **{**{k: v for k, v in cfg.train.items() if k != "_target_"}, "lr": 0.5})
    assert build_spec(SDSpec, options=["sd=greedy"]).temperature == 0.0
    assert build_spec(GateSpec) == build(compose_cfg(["div=speckd"]).div, "div").gate
    with pytest.raises(ConfigError, match="sd.top_p"):
        build_spec(SDSpec, top_p=2.0)


def test_a_partial_gate_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"div.gate=.*missing: \['mode', 'num_candidates', 'beta'\]"):
        build(compose_cfg(["div.gate={top_k:5}"]).div, "div")


def test_the_greedy_setting_reads_the_drafts_the_grid_writes():
    """experiment=qwen_coder_gsm8k_greedy lists the untrained draft and the draft dir of every trained job of
    experiment=qwen_coder_gsm8k (job dirs as its sweep names them) and of the on-policy run, nothing else."""
    from distillspec.resolvers import short_dirname

    grid = compose_cfg(["experiment=qwen_coder_gsm8k"])
    methods = str(grid.hydra.sweeper.params.method).split(",")
    sep = grid.hydra.job.config.override_dirname.kv_sep
    expected = {"null"} | {f"{grid.hydra.sweep.dir}/{i}_{short_dirname(f'method{sep}{m}')}/draft"
                           for i, m in enumerate(methods) if m != "baseline"}
    onpolicy = compose_cfg(["experiment=qwen_coder_gsm8k_onpolicy"])
    expected.add(f"{onpolicy.hydra.run.dir.rstrip('/')}/draft")
    greedy = compose_cfg(["experiment=qwen_coder_gsm8k_greedy"])
    listed = [p.strip() for p in str(greedy.hydra.sweeper.params.draft_checkpoint).split(",")]
    assert sorted(listed) == sorted(expected)
    assert greedy.sd.temperature == 0 and greedy.sd.gamma == grid.sd.gamma and greedy.stage == "eval"
    assert greedy.sd.num_eval == grid.sd.num_eval and greedy.sd.max_new_tokens == grid.sd.max_new_tokens
