"""Paths beyond one device, on CPU: a Hydra sweep through submitit (the SLURM launcher's code path)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import REPO, TINY

from distillspec import constants as C


def test_submitit_local_sweep_runs_two_jobs(tmp_path):
    """`hydra/launcher=submitit_local`: each grid point is a submitit job in its own process, exactly as
    `hydra/launcher=slurm` submits them, without a cluster."""
    sweep = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("sd.gamma=")] + ["stage=eval", "sd.gamma=2,3"]
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", *args,
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / C.METRICS_FILE).exists())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"], [p.name for p in sweep.iterdir()]
    gammas = set()
    for job in jobs:
        saved = json.loads((job / C.METRICS_FILE).read_text())
        assert saved["stage"] == C.STAGE_EVAL and 0.0 <= saved["metrics"][C.ALPHA_TOK] <= 1.0
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        gammas |= {o for o in overrides if o.startswith("sd.gamma=")}
    assert gammas == {"sd.gamma=2", "sd.gamma=3"}
    # submitit ran them as jobs: one folder per job id with its pickled result
    submitted = [d for d in (sweep / ".submitit").iterdir() if any(d.glob("*_result.pkl"))]
    assert len(submitted) == 2, sorted(p.name for p in (sweep / ".submitit").rglob("*"))


def test_multinode_slurm_commands_compose():
    """docs/gpu.md's multi-node DDP commands compose to what Lightning needs under SLURM."""
    from conftest import compose_cfg

    cfg = compose_cfg(["experiment=reference_qwen_gsm8k", "method=rkl", "trainer=ddp", "trainer.num_nodes=2",
                       "trainer.devices=4"])
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 2, 4)
    cfg = compose_cfg(["experiment=reference_qwen_gsm8k", "method=rkl", "hydra/launcher=slurm",
                       "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
                       "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"])
    assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes == 2
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == cfg.trainer.devices == 4
