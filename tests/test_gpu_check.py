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
    # the rollout section (vLLM servers) is skipped on a CPU smoke run, saying why and how to run it anyway
    ro = res["rollout"]
    assert ro["status"].startswith("skipped: no CUDA (--smoke starts no vLLM servers") and "--rollout-vllm" in ro["status"]
    assert ro["rows"] == [] and ro["errors"] == [] and ro["vllm"] is None
    assert f"## Rollouts on vLLM (qwen3-0.6b <- qwen3-4b): {ro['status']}" in printed


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


def test_rollout_section_skips_without_a_vllm_python(monkeypatch):
    """On a CUDA machine without a serving python that imports vLLM, the status names the missing python."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpucheck import rollout
    from gpucheck.common import Ctx, TimeGuard

    monkeypatch.setenv("DISTILLSPEC_VLLM_PYTHON", "/nonexistent/bin/python")
    ctx = Ctx(device=torch.device("cuda", 0), dtype=torch.bfloat16, smoke=False)  # never touched: skipped first
    out = rollout.run(ctx, TimeGuard(60))
    assert out["status"].startswith("skipped: no vLLM serving python (serving env python /nonexistent/bin/python "
                                    "not found") and "DISTILLSPEC_VLLM_PYTHON" in out["status"]
    assert out["rows"] == [] and out["python"] == "/nonexistent/bin/python"


def test_rollout_section_parts_and_helpers():
    """A failing part is a row with its error and the next part still runs; ratios need both sides; the
    placeholder tokenizer covers the whole vocabulary with the given EOS."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpucheck import rollout
    from gpucheck.common import Ctx, TimeGuard

    runner = rollout.Runner(Ctx(device=torch.device("cpu"), dtype=torch.float32, smoke=True), TimeGuard(60))
    assert runner.part("bad", lambda: 1 / 0) is None and runner.part("good", lambda: 7) == 7
    assert runner.errors == ["bad: ZeroDivisionError: division by zero"] and runner.rows[0]["configuration"] == "FAILED"
    assert rollout.Runner(runner.ctx, TimeGuard(0)).part("late", lambda: 7) is None
    rows = [{"key": "data_ours", "tokens_per_s": 100.0}, {"key": "data_vllm", "tokens_per_s": 250.0},
            {"key": "steps_vllm", "peak_gib": 20.0}]
    summ = rollout.summary(rows)
    assert summ["teacher_data_vllm_vs_ours"] == 2.5 and summ["peak_gib_saved"] is None
    tok = rollout.vocab_tokenizer(512, 511)
    assert len(tok) == 512 and tok.eos_token_id == 511 and tok.pad_token_id == 0
    assert tok("<3> <511>", add_special_tokens=False)["input_ids"] == [3, 511] and tok.decode([3, 4]) == "<3> <4>"


def test_rollout_vllm_flag_needs_smoke():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--rollout-vllm"])
    assert exc.value.code == 2
    assert gpu_check.parse_args(["--smoke", "--rollout-vllm"]).rollout_vllm


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_rollout_section_on_cpu_vllm(tmp_path):
    """--smoke --rollout-vllm: the rollout section's code against the real serving env on CPU, tiny shapes: a
    teacher server (random weights of its own) and a student server synced every step (~70 s here)."""
    from conftest import require_serving_env

    require_serving_env()
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--smoke", "--rollout-vllm", "--sections", "rollout",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    ro = json.loads(out.read_text())["rollout"]
    assert ro["status"] == "ran" and ro["errors"] == [] and ro["skipped"] == [], ro
    rows = {r["key"]: r for r in ro["rows"]}
    assert list(rows) == ["data_ours", "steps_hf", "steps_vllm", "data_vllm", "steps_vllm_served"]
    for key in ("data_ours", "data_vllm"):  # 4 prompts x up to 8 tokens (an EOS may end a row early)
        assert 4 <= rows[key]["tokens"] <= 32 and rows[key]["tokens_per_s"] > 0
    for key in ("steps_hf", "steps_vllm", "steps_vllm_served"):  # 1 timed round of 2 prompts x up to 8 tokens
        assert rows[key]["steps_timed"] == 1 and 2 <= rows[key]["tokens"] <= 16 and rows[key]["step_s"] > 0
    assert rows["steps_hf"]["sync_s"] == 0 and rows["steps_vllm"]["sync_s"] > 0
    assert rows["steps_vllm_served"]["teacher_score_s"] > 0
    # the first sync started the server; then one per optimizer step of the two vLLM rows (rounds 0 and 1 each)
    assert ro["student_syncs"] == 4 and set(ro["server_start_s"]) == {"student", "teacher"}
    assert ro["teacher_freed"] is True  # the served rows ran without the teacher in this process
    assert ro["summary"]["teacher_data_vllm_vs_ours"] > 0 and ro["summary"]["peak_gib_saved"] is None  # CPU


def test_spent_budget_skips_sections_and_still_writes_json(tmp_path):
    """Sections the overall budget has no time for are reported as skipped (the report used to fail on the
    train section's missing rows, so nothing was written)."""
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--budget-s", "0.001", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name in ("decode", "equal", "loss", "train", "rollout"):
        assert res[name] == {"skipped": ["time guard (overall budget spent)"]}
        assert f"{name} skipped by the time guard: time guard (overall budget spent)" in proc.stdout


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
