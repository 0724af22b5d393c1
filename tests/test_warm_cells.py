"""experiment=offline_warm's cells: the warm_cell group generated from conf/ (distillspec.warm_cells) composes
exactly what 29 hand-written files would, and the sweep runs its 23 jobs."""

from __future__ import annotations

import pytest
import yaml
from conftest import CONF_DIR, compose_cfg
from omegaconf import OmegaConf

from distillspec.warm_cells import cells

# The sweep's jobs before the change, in order, with (rollout.source, div.divergence, div.adaptive.reverse,
# stage, seed, pair.target_quantization, pair.verify_full_precision) as the hand-written files composed them.
OLD_JOBS = {
    "baseline": ("teacher", "fkl", False, "eval", 1, None, False),
    "fixed_fkl": ("fixed", "fkl", False, "train_eval", 1, None, False),
    "fixed_rkl": ("fixed", "rkl", False, "train_eval", 1, None, False),
    "fixed_jsd": ("fixed", "jsd", False, "train_eval", 1, None, False),
    "fixed_tvd": ("fixed", "tvd", False, "train_eval", 1, None, False),
    "teacher_fkl": ("teacher", "fkl", False, "train_eval", 1, None, False),
    "teacher_rkl": ("teacher", "rkl", False, "train_eval", 1, None, False),
    "teacher_jsd": ("teacher", "jsd", False, "train_eval", 1, None, False),
    "teacher_tvd": ("teacher", "tvd", False, "train_eval", 1, None, False),
    "student_fkl": ("student", "fkl", False, "train_eval", 1, None, False),
    "student_rkl": ("student", "rkl", False, "train_eval", 1, None, False),
    "student_jsd": ("student", "jsd", False, "train_eval", 1, None, False),
    "student_tvd": ("student", "tvd", False, "train_eval", 1, None, False),
    "mixed_fkl": ("mixed", "fkl", False, "train_eval", 1, None, False),
    "mixed_rkl": ("mixed", "rkl", False, "train_eval", 1, None, False),
    "mixed_jsd": ("mixed", "jsd", False, "train_eval", 1, None, False),
    "mixed_tvd": ("mixed", "tvd", False, "train_eval", 1, None, False),
    "teacher_adaptive": ("teacher", "adaptive", False, "train_eval", 1, None, False),
    "teacher_adaptive_reversed": ("teacher", "adaptive", True, "train_eval", 1, None, False),
    "baseline_seed2": ("teacher", "fkl", False, "eval", 2, None, False),
    "teacher_jsd_seed2": ("teacher", "jsd", False, "train_eval", 2, None, False),
    "teacher_tvd_seed2": ("teacher", "tvd", False, "train_eval", 2, None, False),
    "teacher_jsd_8bit": ("teacher", "jsd", False, "train_eval", 1, "8bit", True),
}

# The 29 files conf/warm_cell/ held (commit fc3dad0), verbatim but for their comments: 24 rollout x method pairs,
# the baseline, and four cells built on them (kept as files).
OLD_FILES = {
    **{f"{r}_{m}": {"defaults": [{"override /rollout": r}, {"override /method": m}]}
       for r in ("fixed", "teacher", "student", "mixed")
       for m in ("fkl", "rkl", "jsd", "tvd", "adaptive", "adaptive_reversed")},
    "baseline": {"defaults": [{"override /method": "baseline"}]},
    "baseline_seed2": {"defaults": ["baseline"], "seed": 2},
    "teacher_jsd_seed2": {"defaults": ["teacher_jsd"], "seed": 2},
    "teacher_tvd_seed2": {"defaults": ["teacher_tvd"], "seed": 2},
    "teacher_jsd_8bit": {"defaults": ["teacher_jsd"],
                         "pair": {"target_quantization": "8bit", "verify_full_precision": True}},
}
LEGACY = "legacy_warm_cell"


def _settings(cfg) -> tuple:
    return (cfg.rollout.source, cfg.div.divergence, bool((cfg.div.get("adaptive") or {}).get("reverse", False)),
            cfg.stage, cfg.seed, cfg.pair.target_quantization, cfg.pair.verify_full_precision)


def _job_config(cfg) -> dict:
    out = OmegaConf.to_container(cfg, resolve=False)
    out.pop("hydra")
    return out


def test_the_sweep_runs_the_same_23_jobs():
    exp = yaml.safe_load((CONF_DIR / "experiment" / "offline_warm.yaml").read_text())
    jobs = exp["hydra"]["sweeper"]["params"]["+warm_cell"].split(",")
    assert jobs == list(OLD_JOBS)
    for job in jobs:
        cfg = compose_cfg(["experiment=offline_warm", f"+warm_cell={job}"])
        assert _settings(cfg) == OLD_JOBS[job], job
        assert cfg.hydra.job.override_dirname == f"+warm_cell-{job}"  # the same job dirs: <n>_+warm_cell-<job>


@pytest.mark.parametrize("name", sorted(OLD_FILES))
def test_each_cell_composes_what_its_old_file_did(name):
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for old, node in OLD_FILES.items():  # the old files, as a group of their own beside the generated one
        cs.store(group=LEGACY, name=old, package="_global_", node=node)
    new = compose_cfg(["experiment=offline_warm", f"+warm_cell={name}"])
    old = compose_cfg(["experiment=offline_warm", f"+{LEGACY}={name}"])
    assert _job_config(new) == _job_config(old)


def test_cells_are_generated_from_the_rollout_and_method_groups():
    got = cells()
    rollouts = sorted(p.stem for p in (CONF_DIR / "rollout").glob("*.yaml"))
    methods = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    assert got["baseline"] == {"method": "baseline"}
    assert {k for k in got if k != "baseline"} == {f"{r}_{m}" for r in rollouts for m in methods if m != "baseline"}
    assert got["skd_speckd"] == {"rollout": "skd", "method": "speckd"}  # new pairs need no file either
    assert len(list((CONF_DIR / "warm_cell").glob("*.yaml"))) == 4  # the cells that are more than a pair
