"""Our forward calls use transformers' current cache argument (`cache`), never the deprecated `past_key_values`.

pyproject's pytest `filterwarnings` turns transformers' cache-argument deprecation warnings into errors for every
test; these tests also record the keyword arguments each forward receives, so they fail even without that filter.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from distillspec.models.tiny import tiny_llama, truncate_layers
from distillspec.rollout.sources import RolloutSampler
from distillspec.sd.baseline import autoregressive_generate
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.specs import RolloutSpec
from distillspec.defaults import build_spec

DEPRECATED = ("past_key_values", "cache_params")


def _record_kwargs(model) -> list[set[str]]:
    """Every forward call's keyword names, hooked on the HF model itself (below any PEFT wrapper)."""
    calls: list[set[str]] = []
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(set(kwargs)), with_kwargs=True)
    return calls


def _lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


def _prompts():
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    return ids, mask


def test_transformers_names_the_argument_cache():
    """The version we test with has renamed the argument; if this fails, transformers moved again."""
    assert "cache" in inspect.signature(tiny_llama(104, 1).forward).parameters


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_engine_and_rollouts_pass_cache(wrap, recwarn):
    target = tiny_llama(104, 2, seed=1)
    draft = truncate_layers(target, 1)
    if wrap == "lora":  # train.lora_rank > 0: the student is a PeftModel (forward(**kwargs))
        draft = _lora(draft)
    seen_t, seen_d = _record_kwargs(target), _record_kwargs(draft)
    ids, mask = _prompts()
    gen = torch.Generator().manual_seed(0)
    SpeculativeDecoder(draft, target, gamma=3, temperature=1.0, eos_token_id=[1], pad_token_id=0) \
        .generate(ids, mask, 6, generator=gen)
    autoregressive_generate(draft, ids, mask, 6, temperature=1.0, top_p=1.0, generator=gen, eos_token_id=[1],
                            pad_token_id=0)
    for source in ("student", "teacher", "skd"):  # the rollout sources that decode with a KV cache
        sampler = RolloutSampler(build_spec(RolloutSpec, source=source, cache_top_k=0), draft, target, [1], 0, 6)
        sampler.sample(ids, mask, [None, None], gen)
    cached = [c for c in seen_t + seen_d if c & {"cache", *DEPRECATED}]
    assert cached, "no KV-cached forward was recorded"
    assert all("cache" in c and not c & set(DEPRECATED) for c in cached), cached
    assert not [w for w in recwarn if any(f"`{d}`" in str(w.message) for d in DEPRECATED)]
