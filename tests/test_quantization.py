"""The quantized teacher on the CPU (pair.target_quantization=8bit / 4bit, bitsandbytes' CPU backend): it loads
frozen, scores a batch (teacher scoring, SD verification), stays close to the float32 target, and a tiny run
trains and evaluates with it. Where bitsandbytes is missing these tests skip; the clear error there is
tested in test_models.py / test_planning.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TINY, load_script, run_cfg

from distillspec import constants as C
from distillspec.models.loading import load_model, load_tokenizer, quiet_bitsandbytes, resolve_model_path

quiet_bitsandbytes()  # before bitsandbytes' import: it logs a failed optional Hub kernel fetch (see loading.py)
bnb = pytest.importorskip("bitsandbytes", reason="pair.target_quantization needs bitsandbytes (make install)")


BENCH = load_script("benchmarks/bench_quant.py", "bench_quant")  # its passage and agreement measure, shared
PASSAGE = BENCH.PASSAGE  # plain English prose written for this project: the text the offline pair is compared on
compare = BENCH.agreement


@pytest.fixture(scope="module")
def tiny_models(tiny_pair_dirs):
    draft_dir, target_dir = tiny_pair_dirs
    return (load_model(str(draft_dir), dtype="float32"), load_model(str(target_dir), dtype="float32"),
            load_model(str(target_dir), dtype="float32", quantization="8bit"))


def test_8bit_target_loads_frozen_and_scores_close_to_float32(tiny_models, one_thread):
    """Teacher scoring (completion_logits, as training runs it) with the 8-bit tiny target: float32 logits,
    frozen, eval mode. Measured on these 3 batches (4 x 24 random tokens, 20 scored; bitsandbytes 0.50.2, CPU):
    TV of the next-token distributions 0.036-0.040 mean, 0.07-0.12 max; observed-token |delta log p| 0.22-0.29
    max, 0.074-0.090 mean. Tolerances: about twice that."""
    from distillspec.models.forward import completion_logits
    from distillspec.rollout.sequences import Rollout

    _, fp, q8 = tiny_models
    linears = [m for m in q8.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 4 * 7  # q k v o gate up down per layer; the (tied) head stays float32
    assert not q8.training and not any(p.requires_grad for p in q8.parameters())
    for seed in range(3):
        ids = torch.randint(3, 104, (4, 24), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        r = Rollout(input_ids=ids, attention_mask=mask, prompt_len=4, lengths=torch.full((4,), 20), source="t")
        with torch.no_grad():
            lq, lf = completion_logits(q8, r), completion_logits(fp, r)
        assert lq.dtype == torch.float32 and lq.shape == lf.shape == (4, 20, 104) and lq.isfinite().all()
        m = compare(lf, lq, ids[:, 4:])
        assert 1e-4 < m["tv_mean"] < 0.08 and m["tv_max"] < 0.25, m  # > 0: it really is quantized
        assert m["obs_logp_abs_max"] < 0.8 and m["obs_logp_abs_mean"] < 0.16, m


def test_4bit_target_loads_and_scores_on_cpu(tiny_pair_dirs, one_thread):
    """4-bit (NF4) runs on the CPU too in bitsandbytes 0.50.2. It is far coarser: on the tiny target the mean
    TV to float32 was 0.40-0.42 (8-bit: 0.035-0.038); see docs/quantization.md for the offline pair."""
    _, target_dir = tiny_pair_dirs
    q4 = load_model(str(target_dir), dtype="float32", quantization="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q4.modules())
    with torch.no_grad():
        logits = q4(torch.randint(3, 104, (2, 10))).logits
    assert logits.dtype == torch.float32 and logits.isfinite().all()


def test_bitsandbytes_cast_notice_dropped_other_records_kept(tiny_models, caplog, one_thread):
    """bitsandbytes logs "inputs will be cast from torch.float32 to float16" on every 8-bit matmul: dropped
    (load_model says it once). Other records of the same logger still get through."""
    _, _, q8 = tiny_models
    with caplog.at_level(logging.INFO):
        with torch.no_grad():
            q8(torch.randint(3, 104, (1, 8)))
        logging.getLogger("bitsandbytes.autograd._functions").warning("some other bitsandbytes problem")
    assert "will be cast" not in caplog.text
    assert "some other bitsandbytes problem" in caplog.text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sd_engine_verifies_with_8bit_target(tiny_models, temperature, one_thread):
    """The SD engine with the 8-bit target on a ragged batch runs, with valid counts and probabilities. (Its
    greedy output is not token-identical to the 8-bit target's own greedy decoding: see the next test.)"""
    from distillspec.sd.engine import SpeculativeDecoder
    from tests.sd_stubs import ragged_prompts

    draft, _, q8 = tiny_models
    ids, mask = ragged_prompts([3, 9, 6])
    res = SpeculativeDecoder(draft, q8, gamma=3, temperature=temperature, eos_token_id=1, pad_token_id=0) \
        .generate(ids, mask, 16, generator=torch.Generator().manual_seed(0))
    assert (res.num_accepted <= res.num_drafted).all() and int(res.lengths.min()) >= 1
    assert 0 <= float(res.num_accepted.sum()) / float(res.num_drafted.sum()) <= 1
    assert res.trace_p.isfinite().all() and ((res.trace_accept_prob >= 0) & (res.trace_accept_prob <= 1)).all()


def test_8bit_logits_depend_slightly_on_the_batch(tiny_models, one_thread):
    """LLM.int8() keeps the activation columns holding an outlier (|x| > 6) anywhere in the call's batch in
    float16 and quantizes the rest per token: a sequence's logits depend a little on the other rows (padding
    included) and on the call's shape. Measured: 0.083 max |delta logit| for a 3-token prompt alone vs in this
    padded batch (float32 target: ~1e-6), enough to flip a near-tie, so greedy SD with the 8-bit target is not
    token-identical to that target's own greedy decoding (it is with the float32 target: test_sd_engine.py)."""
    from tests.sd_stubs import ragged_prompts

    _, fp, q8 = tiny_models
    ids, mask = ragged_prompts([3, 9, 6])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        diffs = [(m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0, -1]
                  - m(input_ids=ids[:1, -3:]).logits[0, -1]).abs().max().item() for m in (fp, q8)]
    assert diffs[0] < 1e-4 and diffs[1] < 0.5, diffs


def test_tiny_run_trains_and_evaluates_with_8bit_target(tmp_path):
    """`python run.py pair=tiny pair.target_quantization=8bit ...`: distils against the 8-bit target and
    SD-evaluates with it (docs/quantization.md)."""
    out = run_cfg(TINY + ["pair.target_quantization=8bit"], tmp_path)
    saved = json.loads((tmp_path / C.METRICS_FILE).read_text())
    assert saved["train"]["steps"] == 2 and (tmp_path / "draft" / "config.json").exists()
    assert 0.0 <= saved["metrics"][C.ALPHA_TOK] <= 1.0 and out["metrics"] == saved["metrics"]
    assert json.loads((tmp_path / "run_config.json").read_text())["pair"]["target_quantization"] == "8bit"


def test_verify_full_precision_distils_against_8bit_and_verifies_with_float32(tmp_path):
    """pair.verify_full_precision=true (the study's setting): the 8-bit target is the teacher, the float32 target
    verifies. The run's SD metrics equal a separate stage=eval of its draft against the float32 target (same
    prompts and seeds), and differ from the 8-bit-verified run's."""
    over = TINY + ["train.max_steps=3", "train.lr=1e-2", "sd.temperature=1.0", "compare_untrained=false",
                   "sd.measure_speedup=false", "pair.target_quantization=8bit"]
    full = run_cfg(over + ["pair.verify_full_precision=true"], tmp_path / "full")
    again = run_cfg(TINY + ["stage=eval", "sd.temperature=1.0", "sd.measure_speedup=false",
                            f"draft_checkpoint={tmp_path / 'full' / 'draft'}"], tmp_path / "eval")
    for key in (C.ALPHA_TOK, C.ALPHA_EXPECTED, C.BLOCK_EFFICIENCY):
        assert full["metrics"][key] == pytest.approx(again["metrics"][key], abs=1e-6), key
    q8 = run_cfg(over, tmp_path / "q8")  # the same training, verified by the 8-bit target
    assert q8["metrics"][C.ALPHA_EXPECTED] != pytest.approx(full["metrics"][C.ALPHA_EXPECTED], abs=1e-6)
    from distillspec.errors import ConfigError
    from distillspec.models.loading import PairSpec
    from distillspec.defaults import build_spec

    with pytest.raises(ConfigError, match="pair.verify_full_precision=true needs a quantized teacher"):
        build_spec(PairSpec, draft="tiny:draft", target="tiny:target", verify_full_precision=True)  # would do nothing


def test_full_precision_eval_command():
    """After a quantized-teacher run, run.py also prints the eval command against the full-precision target."""
    import run

    ov = ["pair=tiny", "pair.target_quantization=8bit", "sd.gamma=3"]
    assert run.full_precision_overrides(ov) == ["pair=tiny", "sd.gamma=3", "pair.target_quantization=null"]
    assert run.full_precision_overrides(["experiment=reference_qwen_gsm8k"])[-1] == "pair.target_quantization=null"


@pytest.mark.real_model
def test_offline_target_8bit_close_to_float32(one_thread):
    """SmolLM2-135M (the offline target), float32 vs 8-bit, on 2 x 64 tokens of PASSAGE (126 next-token
    positions). Measured (2-core AMD EPYC, torch 2.13.0+cpu, bitsandbytes 0.50.2): observed-token
    |delta log p| max 0.87, mean 0.156; TV of the next-token distributions mean 0.070, max 0.156; same argmax
    at 92 % of positions; on a 2-core Intel Xeon (AVX-512), 2026-12-04: max 0.95, mean 0.142; TV mean 0.069, max
    0.156; 92 %. (On 8 x 128 GSM8K tokens, benchmarks/bench_quant.py: max 1.77, mean 0.145; TV mean 0.067, max
    0.56; 91 %; on the Xeon max 1.36, mean 0.150; TV 0.067 / 0.58; 92 %.) Tolerances: about 1.5-2x this measurement; a TV near 0 would mean it is not
    quantized. LLM.int8() costs this much on a 135M model: an emulation in plain torch gave TV 0.061 on the
    same kind of text, weight rounding alone 0.030 (docs/quantization.md)."""
    path = resolve_model_path("offline:smollm2-135m")
    ids = load_tokenizer(path)(PASSAGE * 2, return_tensors="pt").input_ids[0, :128].view(2, 64)
    fp = load_model(path, dtype="float32")
    q8 = load_model(path, dtype="float32", quantization="8bit")
    with torch.no_grad():
        m = compare(fp(ids).logits, q8(ids).logits, ids)
    assert m["obs_logp_abs_max"] < 1.5 and m["obs_logp_abs_mean"] < 0.25, m
    assert 0.005 < m["tv_mean"] < 0.12 and m["tv_max"] < 0.3 and m["argmax_agree"] > 0.85, m
