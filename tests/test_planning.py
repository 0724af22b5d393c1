"""Memory planning before loading (`stage=plan`, `dry_run=true`), repo model shapes, and the
clear error for an 8-bit teacher where bitsandbytes is not installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers
from conftest import REPO, TINY, run_cfg

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.models.shapes import SHAPES, config_for, count_parameters, shape_config
from distillspec.planning import GIB, PlanSettings, estimate, fits, options


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight loading fails the test: planning must work from configs alone."""
    def boom(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


@pytest.fixture(scope="module")
def qwen_counts():
    return count_parameters(shape_config("qwen3-0.6b")), count_parameters(shape_config("qwen3-4b"))


def test_meta_count_equals_a_built_model():
    """The meta-device count (tied weights once) equals the numel of a really allocated model."""
    cfg = shape_config("smollm2-135m", num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    pc = count_parameters(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.head == 0 and pc.embedding == 300 * 64  # tied
    untied = count_parameters(shape_config("smollm2-135m", num_hidden_layers=2, hidden_size=64,
                                           intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                           vocab_size=300, tie_word_embeddings=False))
    assert untied.head == 300 * 64 and untied.total == pc.total + 300 * 64


def test_repo_shapes_match_published_sizes(qwen_counts):
    """Qwen3 model cards: 0.6B has 0.44B non-embedding parameters, 4B has 3.6B; SmolLM 360M / 1.7B."""
    small, big = qwen_counts
    assert round((small.total - small.embedding) / 1e9, 2) == 0.44
    assert round((big.total - big.embedding) / 1e9, 1) == 3.6
    assert small.vocab == big.vocab == 151_936
    assert round(count_parameters(shape_config("smollm-360m")).total / 1e6, -1) == 360
    assert round(count_parameters(shape_config("smollm-1.7b")).total / 1e9, 1) == 1.7
    for shape, names in SHAPES.items():  # every id of a conf/pair/ file resolves without the Hub
        for name in names:
            assert config_for(name).vocab_size == shape_config(shape).vocab_size


def test_estimate_responds_to_each_lever(qwen_counts):
    small, big = qwen_counts
    base = PlanSettings(batch=8, prompt_tokens=512, new_tokens=312)
    e = estimate(small, big, base)
    assert e["teacher weights"] == pytest.approx(big.total * 2)
    assert e["optimizer (AdamW)"] == pytest.approx(2 * e["gradients"])
    double = estimate(small, big, PlanSettings(batch=16, prompt_tokens=512, new_tokens=312))
    assert double["activations"] == pytest.approx(2 * e["activations"])
    q8 = estimate(small, big, PlanSettings(batch=8, prompt_tokens=512, new_tokens=312, teacher_quantization="8bit"))
    # 8-bit: linear weights 1 byte, the 389M-entry embedding stays bf16
    assert q8["teacher weights"] == pytest.approx((big.total - big.embedding) + 2 * big.embedding)
    from distillspec.planning import VERIFIER_ROW

    assert VERIFIER_ROW not in q8
    both = estimate(small, big, PlanSettings(batch=8, prompt_tokens=512, new_tokens=312, teacher_quantization="8bit",
                                             full_precision_verifier=True))  # pair.verify_full_precision
    assert both[VERIFIER_ROW] == pytest.approx(big.total * 2)
    assert both["peak"] > q8["peak"] + both[VERIFIER_ROW]  # persistent, plus its share of the slack
    peaks = dict(options(small, big, base))
    assert all(p < peaks["as configured"] for label, p in peaks.items() if label != "as configured")
    assert not fits(e["peak"], (24,))[24] and fits(e["peak"], (80,))[80]
    with pytest.raises(ConfigError, match="teacher quantization '2bit'"):
        PlanSettings(batch=1, prompt_tokens=1, new_tokens=1, teacher_quantization="2bit")


def test_stage_plan_loads_nothing(tmp_path, no_loading, caplog):
    """The reference Qwen experiment planned on a CPU machine: no Hub, no weights, no CUDA (8-bit teacher)."""
    with caplog.at_level("INFO", logger="distillspec"):
        out = run_cfg(TINY + ["experiment=reference_qwen_gsm8k", "pair=qwen3", "pair.target_quantization=8bit",
                              "stage=plan", "plan_cards=[48]"], tmp_path)
    assert f"wrote the memory plan to {tmp_path / C.PLAN_FILE}" in caplog.text  # it says where
    saved = json.loads((tmp_path / C.PLAN_FILE).read_text())
    assert saved == json.loads(json.dumps(out))
    assert not (tmp_path / C.METRICS_FILE).exists()
    assert saved["params"]["teacher"] == 4_022_468_096 and saved["params"]["student"] == 596_049_920
    assert set(saved["fits"]) == {"24", "40", "48", "80"}
    est = saved["estimate_gib"]
    assert est["peak"] > est["teacher weights"] + est["student weights"]


def test_dry_run_flag_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", *TINY, "pair=qwen3", "dry_run=true",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| as configured |" in proc.stdout and "fits 80 GB" in proc.stdout
    plan = json.loads((tmp_path / C.PLAN_FILE).read_text())
    assert plan["estimate_gib"]["peak"] * GIB > plan["params"]["teacher"] * 2


def test_8bit_teacher_without_bitsandbytes_is_a_clear_error(tmp_path, no_loading, monkeypatch):
    """Fails before any loading, naming the setting, bitsandbytes and the fix (run.py turns a ConfigError into
    exit code 2 with this message and no traceback: test_config.test_run_py_reports_config_errors_without_traceback).
    With bitsandbytes installed the 8-bit teacher runs on the CPU too (tests/test_quantization.py)."""
    from distillspec.models import loading

    monkeypatch.setattr(loading, "_bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"target_quantization=8bit needs bitsandbytes.*distillspec\[quant\].*"
                                          r"device=cpu"):
        run_cfg(TINY + ["pair.target_quantization=8bit"], tmp_path)
    assert not (tmp_path / C.METRICS_FILE).exists()


def test_local_rank_under_slurm(monkeypatch):
    """Multi-node DDP under srun: each task's GPU comes from SLURM_LOCALID when LOCAL_RANK is unset."""
    from distillspec.runner import local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_rank() == 1
