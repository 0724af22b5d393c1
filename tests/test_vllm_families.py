"""vLLM's CPU build on the family matrix (real vLLM, `make test-vllm`). Each tiny family pair that the vLLM
check's own rule (serving.commands.vllm_refusal) lets through is decoded greedily with vLLM's draft_model SD,
and its outputs and acceptance counters equal our engine's (first_token="prefill", vLLM's block alignment)
over generations that cross the sliding windows. A pair the rule refuses gets the reason in the check's words;
when vLLM can still load its target, vLLM's greedy decoding of the target alone equals ours.
The models have head_dim 32: vLLM's CPU attention runs no smaller head (the matrix in make test uses 16)."""

from __future__ import annotations

import pytest
from conftest import require_serving_env

from distillspec.models.tiny_families import FAMILIES, VOCAB, build_char_tokenizer, perturbed_copy, tiny_family_model
from distillspec.sd.baseline import autoregressive_generate
from distillspec.sd.engine import SpeculativeDecoder
from distillspec.serving.commands import vllm_refusal
from distillspec.serving.jobs import default_vllm_python, run_vllm
from distillspec.serving.ours import our_counts
from tests.sd_stubs import ragged_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]
LENGTHS = [3, 9, 2, 14, 6, 11]
GAMMA, NEW_TOKENS, EOS = 4, 20, 1
VLLM_REFUSED = {"qwen2_sliding": "max_window_layers=1", "gemma2": "one KV cache group",  # family -> the reason
                "gemma3": "one KV cache group", "gemma3_mm": "torchvision", "gpt_oss": "one KV cache group"}


def _vllm(tmp_path, family: str, prompts: list, target: str, draft: str | None) -> dict:
    job = {"tag": family, "target": target, "draft": draft, "gamma": GAMMA, "prompts": prompts, "temperature": 0.0,
           "max_tokens": NEW_TOKENS, "stop_token_ids": [EOS], "max_model_len": 256, "dtype": "float32",
           "seed": None, "kv_cache_memory_bytes": 256 << 20}
    out = run_vllm(default_vllm_python(), job, tmp_path / "vllm", timeout=1200)
    assert not out.get("failed"), out
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_greedy_sd_equals_ours(family, tmp_path):
    target = tiny_family_model(family, head_dim=32)
    draft = perturbed_copy(target, 0.01)
    tok = build_char_tokenizer()
    dirs = {"target": tmp_path / "target", "draft": tmp_path / "draft"}
    for model, d in ((target, dirs["target"]), (draft, dirs["draft"])):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    require_serving_env()
    ids, mask = ragged_prompts(LENGTHS, vocab=VOCAB)
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(len(LENGTHS))]
    why = vllm_refusal(dirs, cuda=False)
    if family in VLLM_REFUSED:
        assert why is not None and VLLM_REFUSED[family] in why, why
        if vllm_refusal({"target": dirs["target"]}, cuda=False) is None:  # the target alone still loads
            ref = autoregressive_generate(target, ids, mask, NEW_TOKENS, temperature=0, eos_token_id=EOS)
            out = _vllm(tmp_path, family, prompts, str(dirs["target"]), None)
            assert out["outputs"] == [ref.tokens[i, : int(ref.lengths[i])].tolist() for i in range(len(LENGTHS))]
        return
    assert why is None, why
    res = SpeculativeDecoder(draft, target, gamma=GAMMA, temperature=0, eos_token_id=EOS, pad_token_id=0,
                             first_token="prefill").generate(ids, mask, NEW_TOKENS)
    ours = our_counts(res, GAMMA)
    out = _vllm(tmp_path, family, prompts, str(dirs["target"]), str(dirs["draft"]))
    assert out["outputs"] == ours["outputs"]
    assert max(map(len, ours["outputs"])) > 6  # past the window (tiny_families.WINDOW)
    assert 0 < ours["num_accepted_tokens"] < ours["num_draft_tokens"]
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert out["counters"][key] == ours[key], (key, out["counters"], ours)
    assert out["counters"]["num_accepted_tokens_per_pos"] == [round(x * ours["num_drafts"])
                                                              for x in ours["per_position"]]
