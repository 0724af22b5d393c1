"""benchmarks/gpu_check.py: its --smoke mode runs the full check's code on CPU with tiny shapes, under the
imports of the project's GPU machines (no hydra, omegaconf, datasets, wandb, rouge-score, bitsandbytes, trl)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ABSENT_ON_GPU_MACHINES = ("hydra", "omegaconf", "datasets", "wandb", "rouge_score", "bitsandbytes", "trl", "tabulate")
# Run the script with those packages made unimportable (a None entry in sys.modules: `import x` raises
# ImportError, importlib.util.find_spec("x") returns None), as on the GPU machines.
BLOCKED_RUN = f"""
import runpy, sys
sys.modules.update(dict.fromkeys({ABSENT_ON_GPU_MACHINES!r}))
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_smoke_runs_every_section_without_gpu_machine_absentees(smoke):
    res, printed = smoke
    assert res["gpu_run"] is False and res["env"]["smoke"] is True
    assert not any(res["env"]["optional"][m] for m in ("bitsandbytes", "trl", "datasets"))
    for section in ("decode", "equal", "loss", "train"):
        assert "error" not in res[section], res[section]
    assert "| goal | target | measured | result |" in printed


def test_forced_acceptance_paths(smoke):
    """Zeroed output projections make acceptance exact: 1 with draft = target, ~0 with the small draft."""
    d = smoke[0]["decode"]
    rows = {(r["key"], r["B"]): r for r in d["rows"]}
    assert set(rows) >= {(k, b) for k in ("target", "hf_target", "sd_all", "sd_none") for b in (1, 3)}
    assert {("hf_all", 1), ("hf_none", 1)} <= set(rows)
    for b in (1, 3):
        assert rows[("sd_all", b)]["alpha"] == 1.0 and rows[("sd_all", b)]["tau"] == 4.0  # gamma 3
        assert rows[("sd_none", b)]["alpha"] < 0.2
        for key in ("hf_target", "sd_all", "sd_none"):  # every path emits the same fixed-map tokens
            assert rows[(key, b)]["same_as_target"] == f"{rows[(key, b)]['prompts']}/{rows[(key, b)]['prompts']}"
        assert rows[("target", b)]["tokens"] == 8 * rows[("target", b)]["prompts"]
    assert rows[("hf_all", 1)]["same_as_target"] == "1/1"
    # the static KV cache path has the same rows; its CUDA-graph rows and goals need CUDA
    for b in (1, 3):
        assert rows[("sd_all_static", b)]["alpha"] == 1.0 and rows[("sd_all_static", b)]["tau"] == 4.0
        for key in ("target_static", "sd_all_static", "sd_none_static"):
            assert rows[(key, b)]["same_as_target"] == f"{rows[(key, b)]['prompts']}/{rows[(key, b)]['prompts']}"
    assert not any(key.endswith("_graph") for key, _ in rows)
    measured = [g["pass"] in ("pass", "FAIL") for g in d["goals"]]
    assert measured == [True] * 5 + [False] * 3  # every goal measured but the CUDA-graph ones
    assert all(c["c"] > 0 and c["verify ratio"] > 0 for c in d["costs"])
    assert [(c["B"], c["cache"]) for c in d["costs"]] == [(1, "dynamic"), (1, "static"), (3, "dynamic"), (3, "static")]


def test_equality_loss_and_train_sections(smoke):
    res = smoke[0]
    eq = res["equal"]
    assert eq["sd_equals_target"] == eq["rows"] == 4 and eq["target_equals_hf"] == 4
    assert eq["sd_static_equals_target"] == eq["target_static_equals_target"] == 4 and "sd_graph_equals_target" not in eq
    assert 0.1 < eq["alpha"] < 0.9  # partly accepted blocks: the ragged rollback path was exercised
    assert [r["chunk_size"] for r in res["loss"]] == [1024, None] and all(r["finite"] for r in res["loss"])
    rows = res["train"]["rows"]
    assert rows[0]["completion_tokens"] == 2 * 8  # batch 2 x 8 new tokens, no EOS with random weights
    assert any("bitsandbytes not installed" in s for s in res["train"]["skipped"])


def test_time_guard_skips_rows_it_has_no_time_for():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpucheck import decode
    from gpucheck.common import Ctx, TimeGuard

    ctx = Ctx(device=torch.device("cpu"), dtype=torch.float32, smoke=True)
    out = decode.run(ctx, TimeGuard(0), batch_sizes=(1, 2), prompt_len=8, new_tokens=4, gamma=2, b1_prompts=1)
    assert out["rows"] == [] and out["costs"] == []
    assert {"target B=1", "sd_all B=2", "call costs B=2"} <= set(out["skipped"])
    assert {g["pass"] for g in out["goals"]} == {"not measured"}


def test_full_check_without_cuda_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "x.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_check_on_gpu(tmp_path):  # pragma: no cover - no GPU on the dev/CI machines
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--budget-s", "400"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["gpu_run"] and res["equal"]["rows"] > 0
