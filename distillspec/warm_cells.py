"""The `warm_cell` config group (experiment=offline_warm's sweep axis), generated from conf/ instead of written.

A cell is one rollout source and one method: `<rollout>_<method>` for every option of conf/rollout/ and every
option of conf/method/ but baseline, plus `baseline` (no training: the rollout does not matter). Each is stored
in Hydra's ConfigStore as the config a hand-written conf/warm_cell/<rollout>_<method>.yaml would hold:

    # @package _global_
    defaults:
      - override /rollout: <rollout>
      - override /method: <method>

so `+warm_cell=teacher_fkl` composes exactly what that file did. Cells that are more than a pair (a second
seed, an 8-bit teacher) stay files in conf/warm_cell/ and build on a generated one (`defaults: [teacher_jsd]`).
Registered by distillspec.resolvers.register(), which run.py and the tests call before Hydra composes.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUP = "warm_cell"
BASELINE = "baseline"

__all__ = ["cells", "register_cells"]


def _options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def cells(conf_dir: Path = CONF_DIR) -> dict[str, dict[str, str]]:
    """{cell name: {"rollout": option (absent for baseline), "method": option}} from conf_dir's groups."""
    out: dict[str, dict[str, str]] = {BASELINE: {"method": BASELINE}}
    for method in _options(conf_dir, "method"):
        if method != BASELINE:
            for rollout in _options(conf_dir, "rollout"):
                out[f"{rollout}_{method}"] = {"rollout": rollout, "method": method}
    return out


def register_cells(conf_dir: Path = CONF_DIR) -> None:
    """Store every cell of `cells()` in the ConfigStore (group warm_cell, package _global_); idempotent. Names
    with a file in conf/warm_cell/ are left to the file."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    files = set(_options(conf_dir, GROUP))
    for name, parts in cells(conf_dir).items():
        if name not in files:
            defaults = [{f"override /{group}": option} for group, option in parts.items()]
            cs.store(group=GROUP, name=name, package="_global_", node={"defaults": defaults})
