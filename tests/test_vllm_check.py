"""The vLLM check's refusals and failure handling, without vLLM (`make test`).

Fake serving pythons (small scripts) stand in for `.venv-vllm/bin/python`: one that cannot import vllm, one
that is not a program, one that runs our vllm_runner's protocol with made-up counters and fails one job.
The real vLLM runs are in tests/test_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from pathlib import Path

import pytest
from conftest import TINY, load_script, run_cfg

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.serving import check as chk
from distillspec.serving import jobs
from distillspec.serving.commands import VLLM_CPU_HEAD_SIZES, head_dim, vllm_refusal

GIB = 1 << 30


def _fake_python(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport json, sys\n{body}\n")
    path.chmod(0o755)
    return path


def _run_dir(tmp_path: Path, metrics: dict, config: dict | None = None, name: str = "run") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / C.METRICS_FILE).write_text(json.dumps(metrics))
    (d / C.RUN_CONFIG_FILE).write_text(json.dumps(config or {}))
    return d


@pytest.fixture(scope="module")
def pair32(tmp_path_factory) -> tuple[Path, Path]:
    """(draft_dir, target_dir): the tiny pair with head_dim 32 (hidden 128, 4 heads), which vLLM's CPU build runs."""
    from distillspec.models.tiny import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny32"), hidden=128)


def test_trained_run_without_its_draft_is_refused(tmp_path, capsys):
    """A train_eval run whose draft/ is gone is not checked with the untrained draft it started from."""
    run = _run_dir(tmp_path, {"stage": C.STAGE_TRAIN_EVAL, "draft": "offline:smollm2-135m-L4",
                              "target": "offline:smollm2-135m", "metrics": {C.ALPHA_TOK: 0.5},
                              "train": {"draft_dir": "x/draft"}})
    with pytest.raises(ConfigError, match=r"trained a draft but .*draft is missing.*untrained offline:smollm2-135m-L4"):
        chk.load_run(run)
    (run / "draft").mkdir()  # half-written: no config.json
    assert chk.main([str(run), "--preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert "incomplete (no config.json)" in err and len(err.splitlines()) == 1


def test_eval_run_checks_the_draft_it_evaluated(tmp_path):
    run = _run_dir(tmp_path, {"stage": C.STAGE_EVAL, "draft": "/some/draft", "target": "t", "metrics": {}})
    assert chk.load_run(run).draft == "/some/draft"


@pytest.mark.parametrize("which", [C.METRICS_FILE, C.RUN_CONFIG_FILE])
def test_damaged_run_files_give_one_line_naming_the_file(tmp_path, capsys, which):
    run = _run_dir(tmp_path, {"stage": C.STAGE_EVAL, "draft": "d", "target": "t", "metrics": {}})
    (run / which).write_text('{"stage": "eval", "metr')
    assert chk.main([str(run), "--preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / which) in err and "damaged" in err


def test_sweep_dir_asks_for_a_job_dir(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "grid"
    for j in ("0", "1"):
        _run_dir(sweep, {"stage": C.STAGE_EVAL, "draft": "d", "target": "t", "metrics": {}}, name=j)
    assert chk.main([str(sweep), "--preflight"]) == 2
    err = capsys.readouterr().err
    assert "is a sweep dir (2 job dirs" in err and f"make vllm-check RUN={sweep / '0'}" in err


def test_head_size_rule_refuses_the_tiny_pair_early(tiny_pair_dirs, pair32, tmp_path, capsys):
    """vLLM's CPU attention runs only VLLM_CPU_HEAD_SIZES; the tiny pair (head_dim 16) is refused in one line."""
    draft16, target16 = tiny_pair_dirs
    assert head_dim(target16) == 16 and 16 not in VLLM_CPU_HEAD_SIZES and head_dim(pair32[1]) == 32
    assert "head_dim 16" in vllm_refusal({"target": target16, "draft": draft16}, cuda=False)
    assert vllm_refusal({"target": target16}, cuda=True) is None
    assert vllm_refusal({"target": pair32[1], "draft": pair32[0]}, cuda=False) is None
    run = _run_dir(tmp_path, {"stage": C.STAGE_EVAL, "draft": str(draft16), "target": str(target16), "metrics": {}})
    assert chk.main([str(run), "--preflight"]) == (0 if chk_cuda() else 2)
    if not chk_cuda():
        assert "head_dim 16" in capsys.readouterr().err


def chk_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(chk_cuda(), reason="the head-size rule is for vLLM's CPU build")
def test_run_py_prints_no_vllm_commands_for_the_tiny_pair(tiny_pair_dirs, pair32, tmp_path, caplog):
    run_py = load_script("run.py", "run_for_serving_test")
    caplog.set_level(logging.INFO, logger="distillspec")
    draft16, target16 = tiny_pair_dirs
    out = {"target": str(target16), "metrics": {C.GAMMA: 3}}
    run_py.log_serving(out, tmp_path / "run", draft16, tmp_path, 3)
    assert "make vllm-check" not in caplog.text and "vllm serve" not in caplog.text
    assert "head_dim 16" in caplog.text
    caplog.clear()
    run_py.log_serving({"target": str(pair32[1]), "metrics": {C.GAMMA: 3}}, tmp_path / "run", pair32[0], tmp_path, 3)
    assert "make vllm-check RUN=run" in caplog.text and "vllm serve" in caplog.text


@pytest.mark.parametrize("kind", ["no_vllm", "not_a_program", "bin_true", "old_vllm"])
def test_serving_python_is_checked_before_any_work(pair32, tmp_path, monkeypatch, kind):
    """A serving python without vLLM (or not a python at all, or a program that prints nothing) is refused in
    one line before any model is loaded."""
    if kind == "bin_true":  # --vllm-python /bin/true: runs, prints nothing
        py = Path("/bin/true")
        match = r"/bin/true is not a python with vLLM \(asked for vLLM's version, it printed nothing\)"
    elif kind == "no_vllm":
        py = _fake_python(tmp_path / "python", "print(\"ModuleNotFoundError: No module named 'vllm'\", "
                                               "file=sys.stderr); sys.exit(1)")
        match = r"cannot import vllm \(ModuleNotFoundError: No module named 'vllm'\)"
    elif kind == "not_a_program":
        py = tmp_path / "hostname"
        py.write_text("myhost\n")
        py.chmod(0o755)
        match = r"cannot run \(Exec format error\)"
    else:
        py = _fake_python(tmp_path / "python", "print('0.31.2')")
        match = r"has vLLM 0.31.2; the check needs vLLM >= 0.32"
    draft, target = pair32
    run = _run_dir(tmp_path, {"stage": C.STAGE_EVAL, "draft": str(draft), "target": str(target), "metrics": {}})

    def no_work(*a, **k):
        raise AssertionError("loaded a model before checking the serving python")

    monkeypatch.setattr("distillspec.models.loading.load_model", no_work)
    monkeypatch.setattr("distillspec.models.loading.load_tokenizer", no_work)
    monkeypatch.setattr(chk, "build_specs", no_work)
    with pytest.raises(ConfigError, match=match) as e:
        chk.check(run, py)
    assert str(py) in str(e.value) and "\n" not in str(e.value)


def test_kv_space_is_sized_from_the_prompts_and_the_machine(pair32):
    draft, target = pair32
    kv_heads = json.loads((target / "config.json").read_text())["num_key_value_heads"]
    # 2 (K, V) x 4 layers x kv heads x head_dim 32 x float32
    assert jobs.kv_bytes_per_token(target) == 2 * 4 * kv_heads * 32 * 4
    one = jobs.kv_cache_bytes([20] * 8, 64, 5, 1024, [str(target), str(draft)], available=None)
    assert 0 < one < GIB // 4  # far below the fixed 4 GiB the check used to ask for
    more = jobs.kv_cache_bytes([200] * 64, 256, 5, 1024, [str(target), str(draft)], available=None)
    assert more > one
    capped = jobs.kv_cache_bytes([200] * 64, 256, 5, 1024, [str(target), str(draft)], available=more // 2)
    floor = (jobs.kv_bytes_per_token(target) + jobs.kv_bytes_per_token(draft)) * 1024 + (64 << 20)
    assert floor <= capped < more


# A fake serving python speaking vllm_runner's protocol: made-up counters, per-request histograms, and
# one job that fails as the 1.5B pair's self-draft row did (the log says why).
_FAKE_RUNNER = """
args = sys.argv[1:]
if args[0] == "-c":
    print("0.32.0"); sys.exit(0)
assert args[:2] == ["-m", "distillspec.serving.vllm_runner"], args
job = json.load(open(args[2]))
if job["tag"] == FAIL:
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: Available memory on node 0 (3.79/23.59 GiB) on kv cache allocation is less than "
          "requested memory for kv (4.0 GiB).", file=sys.stderr)
    print("RuntimeError: Engine core initialization failed. See root cause above.", file=sys.stderr)
    sys.exit(1)
g, n = job["gamma"], len(job["prompts"])
hist = [[2, 1] + [0] * (g - 1) for _ in range(n)]  # 3 drafts, 1 accepted token per request
spec = job.get("draft") is not None
c = {"num_drafts": 3 * n if spec else 0, "num_draft_tokens": 3 * g * n if spec else 0,
     "num_accepted_tokens": n if spec else 0, "num_accepted_tokens_per_pos": ([n] + [0] * (g - 1)) if spec else []}
out = {"outputs": [[5] * job["max_tokens"] for _ in range(n)], "finish_reasons": ["length"] * n, "counters": c,
       "per_request": [{"acceptance_histogram": h, "num_draft_tokens": 3 * g} for h in hist] if spec else None,
       "load_s": 0.1, "generate_s": 0.1, "num_output_tokens": n * job["max_tokens"], "vllm_version": "0.32.0",
       "speculative_config": None, "patched_cpu_expand": bool(job.get("patch_cpu_expand"))}
json.dump(out, open(args[3], "w"))
"""


def test_a_failed_vllm_job_is_a_failed_row_and_the_others_are_kept(pair32, tmp_path, monkeypatch, capsys):
    """One vLLM job fails (out of memory); the table is written with that row FAILED, its reason and
    its kept log; our models are freed before vLLM starts; the KV space is sized, not a fixed 4 GiB."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    draft, target = pair32
    run = tmp_path / "run"
    run_cfg([*TINY, "stage=eval", f"pair.draft={draft}", f"pair.target={target}", "sd.temperature=1.0", "sd.top_p=1.0",
             "sd.measure_speedup=false", "sd.draft_quality=false"], run)
    py = _fake_python(tmp_path / "python", "FAIL = 'self_greedy'\n" + _FAKE_RUNNER)

    from distillspec.models import loading

    loaded: list[weakref.ref] = []
    real_load, real_run_vllm = loading.load_model, chk.run_vllm

    def load_model(*a, **k):
        m = real_load(*a, **k)
        loaded.append(weakref.ref(m))
        return m

    def run_vllm(*a, **k):
        assert loaded and all(r() is None for r in loaded), "our models are still in memory while vLLM runs"
        return real_run_vllm(*a, **k)

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(chk, "run_vllm", run_vllm)
    monkeypatch.chdir(tmp_path)
    assert chk.main([str(run), "--vllm-python", str(py)]) == 1
    res = json.loads((run / chk.RESULT_FILE).read_text())
    assert set(res["failed"]) == {"self_greedy"}
    fail = res["failed"]["self_greedy"]
    assert fail["reason"].startswith("ValueError: Available memory on node 0")
    assert Path(fail["log"]).is_file() and Path(fail["log"]).parent == run / jobs.LOG_DIR
    modes = {r["vllm_run"]: r for r in res["modes"]}
    assert modes["self_greedy"]["flag"] == "FAILED"
    assert modes["self_probabilistic"]["flag"] != "FAILED"  # the jobs after the failed one still ran
    assert modes["draft_probabilistic"]["vllm_rate"] == pytest.approx(1 / 9)
    table = (run / chk.TABLE_FILE).read_text()
    assert "FAILED" in table and "## Failed vLLM jobs" in table and fail["log"] in table
    for tag in ("draft_default", "self_probabilistic"):
        job = json.loads((run / jobs.LOG_DIR / f"{tag}.job.json").read_text())
        assert 0 < job["kv_cache_memory_bytes"] < GIB
    assert "1 vLLM job(s) failed: self_greedy" in capsys.readouterr().err


def test_make_vllm_check_without_run_prints_usage_before_building_anything(tmp_path):
    """`make vllm-check` without RUN: its usage comes before any step that builds the serving env (dry run,
    with the serving env pointed at a dir that does not exist, so that building it would be due)."""
    import subprocess

    from conftest import REPO

    p = subprocess.run(["make", "-n", "vllm-check", f"VLLM_VENV={tmp_path / 'no-venv'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "RUN": ""})
    assert "usage: make vllm-check RUN=" in p.stdout, p.stdout + p.stderr
    before = p.stdout.split("usage: make vllm-check RUN=")[0]
    assert "no-venv" not in before and "pip install" not in before


def test_rows_option_selects_vllm_jobs_and_refuses_unknown_ones():
    base = {"gamma": 3}
    tags = [j["tag"] for j in jobs.plan_jobs(base, "d", "t", sampled=True, patch=True)]
    assert tags == ["target_only", "draft_default", "draft_probabilistic", "self_greedy", "self_probabilistic",
                    "self_probabilistic_patched", "draft_probabilistic_patched"]
    assert [j["tag"] for j in jobs.plan_jobs(base, "d", "t", True, True, rows=("draft_probabilistic_patched",))] \
        == ["draft_probabilistic_patched"]
    with pytest.raises(ConfigError, match="--rows self_greedy: not a vLLM row of this check; valid: target_only, "
                                          "draft_default"):
        jobs.plan_jobs(base, "d", "t", sampled=False, patch=True, rows=("self_greedy",))


def test_error_line_finds_the_root_cause_in_vllms_engine_log():
    log = ("INFO 12-05 loading\n(EngineCore pid=13194) Traceback (most recent call last):\n"
           "(EngineCore pid=13194) ValueError: Available memory on node 0 (3.79/23.59 GiB) on kv cache allocation\n"
           "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert jobs.error_line(log) == "ValueError: Available memory on node 0 (3.79/23.59 GiB) on kv cache allocation"
    assert jobs.error_line("UserWarning: x\nall fine\n") is None
