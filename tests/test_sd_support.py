"""Architectures the SD engine cannot decode are refused from their config, before any model loads or any
teacher data is made; the families it decodes pass."""

from __future__ import annotations

import time

import pytest
import transformers as T
from conftest import TINY
from fake_vllm import run_py

from distillspec.errors import ConfigError
from distillspec.models.loading import PairSpec
from distillspec.defaults import build_spec
from distillspec.models.tiny_families import FAMILIES, family_config
from distillspec.sd import support
from tests.sd_stubs import perturbed_pair

VLLM_MIXED_DRAFTS = ("gemma2", "gemma3", "gpt_oss")  # sliding and full layers

UNSUPPORTED = {  # config -> what the refusal names
    "llama4": (lambda: T.Llama4TextConfig(num_hidden_layers=2), "chunked_attention"),
    "qwen3_next": (lambda: T.Qwen3NextConfig(num_hidden_layers=2), "recurrent"),
    "mamba": (lambda: T.MambaConfig(num_hidden_layers=2), "recurrent"),
    "gemma3n": (lambda: T.Gemma3nTextConfig(num_hidden_layers=2), "shares KV caches"),
    "gemma3_bidirectional": (lambda: T.Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True),
                             "bidirectional"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_configs_are_named(name):
    make, reason = UNSUPPORTED[name]
    cfg = make()
    for form in (cfg, cfg.to_dict()):  # a loaded config and a config.json
        assert reason in support.problem(form)
    with pytest.raises(ConfigError, match=f"pair.target=x .*cannot be decoded by the SD engine: .*{reason}.*; use"):
        support.check_config(cfg, "pair.target=x")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_configs_are_supported(family):
    cfg = family_config(family)
    assert support.problem(cfg) is None and support.problem(cfg.to_dict()) is None


def test_pair_spec_refuses_an_unsupported_model_dir_without_loading(tmp_path, monkeypatch):
    cfg = T.Qwen3NextConfig(num_hidden_layers=2)
    cfg.architectures = ["Qwen3NextForCausalLM"]  # as a checkpoint's config.json names it
    cfg.save_pretrained(tmp_path / "next")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"pair.target=.*next \(Qwen3NextForCausalLM\) .*qwen3_next"):
        build_spec(PairSpec, draft="tiny:draft", target=str(tmp_path / "next"))


def test_sliding_model_with_a_flash_attention_implementation_is_refused():
    from distillspec.models.tiny_families import tiny_family_model
    from distillspec.sd.engine import SpeculativeDecoder

    model = tiny_family_model("mistral")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="sliding-window layers.*flash_attention_2.*'sdpa' or 'eager'"):
        SpeculativeDecoder(model, model)
    draft, target = perturbed_pair()
    target.config.layer_types = ["chunked_attention"] * 2
    with pytest.raises(ConfigError, match="chunked_attention"):
        SpeculativeDecoder(draft, target)


def test_training_run_on_an_unsupported_architecture_is_refused_at_launch(tmp_path, monkeypatch):
    """run.py on a Qwen3-Next pair: refused within seconds, with nothing trained and no teacher data made."""
    model_dir = tmp_path / "qwen3-next"
    T.Qwen3NextConfig(num_hidden_layers=2).save_pretrained(model_dir)
    store = tmp_path / "teacher_data"
    args = [a for a in TINY if not a.startswith("pair=")]
    start = time.monotonic()
    out = run_py([*args, "stage=train_eval", "rollout=teacher", f"pair.target={model_dir}", f"pair.draft={model_dir}"],
                 tmp_path / "run", env={"DISTILLSPEC_TEACHER_DATA": str(store)})
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot be decoded by the SD engine" in out.stderr and "qwen3_next" in out.stderr
    assert "Traceback" not in out.stderr
    assert elapsed < 60  # seconds on a loaded 2-core machine: Python start, Hydra, the specs (no torch model)
    assert not store.exists()
    assert not any((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vllm_check_says_which_family_pairs_vllm_cannot_serve(family, tmp_path):
    """serving.commands.vllm_refusal (the vLLM check's preflight) on each family's config as target and draft:
    Qwen2 with sliding layers after max_window_layers (vLLM's Qwen2 model refuses it) and drafts that mix sliding
    and full layers (vLLM's draft_model needs one KV cache group) and multimodal Gemma 3 (no torchvision in the
    serving env) on any device; on the CPU, the matrix's head_dim 16, below vLLM's CPU attention. At head_dim 32
    the others pass (tests/test_vllm_families.py runs them)."""
    from distillspec.serving.commands import vllm_refusal

    for head_dim in (16, 32):
        d = tmp_path / str(head_dim)
        family_config(family, head_dim=head_dim).save_pretrained(d)
        why = vllm_refusal({"target": d, "draft": d}, cuda=False)
        if family == "qwen2_sliding":
            assert "some layers only" in why and "max_window_layers=1" in why
        elif family == "gemma3_mm":
            assert "torchvision" in why and "(gemma3)" in why
        elif family in VLLM_MIXED_DRAFTS:
            assert "as the draft" in why and "one KV cache group" in why
            assert vllm_refusal({"target": d, "draft": d}, cuda=True) == why
        elif head_dim == 16:
            assert "head_dim 16 is not one of the head sizes" in why
        else:
            assert why is None
        assert (vllm_refusal({"target": d}, cuda=True) is None) == (family not in ("qwen2_sliding", "gemma3_mm"))
