"""`python run.py --help` prints this project's page (Hydra's help template in conf/hydra/default.yaml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from distillspec import constants as C

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_stages_groups_options_examples_and_outputs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "powered by Hydra" not in out  # not Hydra's generic page
    assert out.startswith("distillspec")
    for stage in C.STAGES:
        assert f"\n{stage} " in out, stage
    groups = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra")
    from distillspec.warm_cells import GROUP, cells

    for group in groups:  # every group with every option file (and generated option), as Hydra lists them
        options = {f.stem for f in (REPO / "conf" / group).glob("*.yaml")} | (set(cells()) if group == GROUP else set())
        options = sorted(options)
        assert f"{group}: {', '.join(options)}" in out, group
    for key in ("train.max_steps=", "sd.gamma=", "sd.temperature=", "div.divergence=", "draft_checkpoint=",
                "name=", "resume="):
        assert key in out, key
    assert "== Examples ==" in out and "python run.py -m " in out and "stage=eval" in out
    assert "outputs/<name>/<overrides>/" in out and "multirun/<name>/" in out and C.METRICS_FILE in out
    assert not list(tmp_path.iterdir())  # printing help creates no outputs/ directory
