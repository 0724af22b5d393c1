"""SDEvaluator: the draft's own task quality is scored on draft-only generations, next to the SD outputs'."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillspec import constants as C
from distillspec.evaluation import SDEvaluator, eos_token_ids
from distillspec.lit.data import left_pad
from distillspec.sd.baseline import autoregressive_generate
from distillspec.specs import SDSpec
from distillspec.defaults import build_spec


class LengthTask:
    """A task whose 'quality' is a number that differs between generations: mean output length in chars."""

    quality_metrics = ("chars",)

    @staticmethod
    def score(texts, refs):
        return {"chars": sum(len(t) for t in texts) / len(texts)}


@pytest.fixture(scope="module")
def tiny(tiny_pair_dirs):
    draft_dir, target_dir = tiny_pair_dirs
    load = lambda d: AutoModelForCausalLM.from_pretrained(d).eval()  # noqa: E731
    return load(draft_dir), load(target_dir), AutoTokenizer.from_pretrained(target_dir)


def _evaluate(draft, target, tok, spec, prompts):
    items = [SimpleNamespace(input_ids=tok(p)["input_ids"], reference="", uid=str(i), prompt_text=p)
             for i, p in enumerate(prompts)]
    ev = SDEvaluator(draft, target, tok, spec, LengthTask(), items, max_new_tokens=10, seed=3)
    ids, mask = left_pad([it.input_ids for it in items], tok.pad_token_id)
    batch = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(len(items))}
    return ev.finalize([ev.evaluate_batch(batch, 0)]), ids, mask


PROMPTS = ["12+7=", "hello there, ", "x"]


def test_draft_quality_is_scored_on_draft_only_generations(tiny, one_thread):
    draft, target, tok = tiny
    spec = build_spec(SDSpec, gamma=3, temperature=0.0, measure_speedup=False, draft_quality=True)
    report, ids, mask = _evaluate(draft, target, tok, spec, PROMPTS)
    own = autoregressive_generate(draft, ids, mask, 10, temperature=0.0, eos_token_id=eos_token_ids(tok, target),
                                  pad_token_id=tok.pad_token_id)
    texts = [tok.decode(own.tokens[i, : int(own.lengths[i])].tolist(), skip_special_tokens=True)
             for i in range(len(PROMPTS))]
    assert report.metrics[C.DRAFT_QUALITY_PREFIX + "chars"] == pytest.approx(LengthTask.score(texts, None)["chars"])
    # Precondition that makes the check bite: the target's outputs (= SD's, greedy) score differently.
    assert report.metrics[C.QUALITY_PREFIX + "chars"] != report.metrics[C.DRAFT_QUALITY_PREFIX + "chars"]
    # The same model as draft and target: its own greedy outputs are the SD outputs, so the scores agree.
    same, _, _ = _evaluate(target, target, tok, spec, PROMPTS)
    assert same.metrics[C.DRAFT_QUALITY_PREFIX + "chars"] == same.metrics[C.QUALITY_PREFIX + "chars"]
    off, _, _ = _evaluate(draft, target, tok, build_spec(SDSpec, gamma=3, temperature=0.0, measure_speedup=False,
                                                         draft_quality=False), PROMPTS)
    assert C.DRAFT_QUALITY_PREFIX + "chars" not in off.metrics


def test_untimed_evaluation_decodes_once_per_batch(tiny, one_thread, monkeypatch):
    """Acceptance-only passes (the untrained draft's, the training curve's) skip the timing warm-up
    and the target-only pass: one SD generation per batch. Timed passes keep the warm-up and both paths."""
    from distillspec.sd.engine import SpeculativeDecoder

    calls = []
    real = SpeculativeDecoder.generate
    monkeypatch.setattr(SpeculativeDecoder, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    draft, target, tok = tiny
    _evaluate(draft, target, tok, build_spec(SDSpec, gamma=3, temperature=0.0, measure_speedup=False), PROMPTS)
    assert len(calls) == 1
    calls.clear()
    report, _, _ = _evaluate(draft, target, tok, build_spec(SDSpec, gamma=3, temperature=0.0, speed_repeats=1), PROMPTS)
    assert len(calls) == 2 and C.SPEEDUP in report.metrics  # warm-up + the timed round


class AnswerTask(LengthTask):
    """LengthTask whose outputs never contain the final answer (as the demo's 96-token cap cuts most)."""

    @staticmethod
    def has_final_answer(text):
        return False


def test_answers_cut_by_the_token_cap_are_recorded_and_quality_is_not_summarised(tiny, one_thread, caplog):
    from distillspec.runner import log_summary

    draft, target, tok = tiny
    items = [SimpleNamespace(input_ids=tok(p)["input_ids"], reference="", uid=str(i), prompt_text=p)
             for i, p in enumerate(PROMPTS)]
    spec = build_spec(SDSpec, gamma=3, temperature=0.0, measure_speedup=False)
    ev = SDEvaluator(draft, target, tok, spec, AnswerTask(), items, max_new_tokens=10, seed=3)
    ids, mask = left_pad([it.input_ids for it in items], tok.pad_token_id)
    report = ev.finalize([ev.evaluate_batch({"input_ids": ids, "attention_mask": mask,
                                             "index": torch.arange(len(items))}, 0)])
    cut = report.metrics[C.ANSWER_CUT_FRACTION]
    assert cut == report.metrics[C.TRUNCATED_FRACTION] > 0.5  # every output that hit the cap lacks the answer
    with caplog.at_level("INFO", logger="distillspec"):
        log_summary({"stage": "eval", "draft": "d", "metrics": report.metrics})
    assert "task quality not shown" in caplog.text and "'quality/chars'" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="distillspec"):
        log_summary({"stage": "eval", "draft": "d", "metrics": {**report.metrics, C.ANSWER_CUT_FRACTION: 0.25}})
    assert "task quality not shown" not in caplog.text and "'quality/chars'" in caplog.text


def test_every_evaluation_path_gives_the_same_numbers(tiny, one_thread, tmp_path):
    """Two batches at T > 0: the final evaluation (timed, logged; the draft trainable, as a run loads it), the
    untrained-draft evaluation and the vLLM check's recomputation (the draft frozen, as the check loads it), and
    training's periodic evaluation (called inside a training step: the student trainable and in train mode, under
    bf16 autocast as Lightning's mixed precision runs it) give identical numbers, down to the last bit of each
    example's expected acceptance. Each leaves the draft as it found it; the loggers get the final metrics."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from distillspec.lit.train_loop import curve_evaluator
    from distillspec.runner import evaluate, untrained_eval
    from distillspec.serving.ours import run_ours
    from distillspec.specs import TrainSpec
    from distillspec.defaults import build_spec

    draft, target, tok = tiny
    prompts = PROMPTS + ["7*8=", "a b c d"]
    items = [SimpleNamespace(input_ids=tok(p)["input_ids"], reference="", uid=str(i), prompt_text=p)
             for i, p in enumerate(prompts)]
    models = SimpleNamespace(draft=draft, sd_target=target, tokenizer=tok)
    sd = build_spec(SDSpec, gamma=3, temperature=1.0, top_p=1.0, batch_size=3, speed_repeats=1, compute_quality=False)
    cpu, task = torch.device("cpu"), LengthTask()
    logger = CSVLogger(tmp_path, name="csv", version="")
    flags = [p.requires_grad for p in draft.parameters()]
    try:
        draft.requires_grad_(True)
        final = evaluate(models, tok, task, items, sd, 12, 5, cpu, [logger], step=7)
        assert all(p.requires_grad for p in draft.parameters())
        curve_train = build_spec(TrainSpec, eval_every=1, eval_num=len(items))
        curve = curve_evaluator(draft, models, task, items, curve_train, sd, 5, 12)
        draft.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            periodic = curve.run(cpu, progress=False)
        assert draft.training and all(p.requires_grad for p in draft.parameters())
        draft.eval().requires_grad_(False)
        before = untrained_eval(models, tok, task, items, sd, 12, 5, cpu, {})
        check = run_ours(draft, target, tok, task, items, sd, 12, 5, sd.first_token)
    finally:
        draft.eval()
        for p, flag in zip(draft.parameters(), flags):
            p.requires_grad_(flag)

    assert len(final.per_example) == len(prompts) and sum(r["num_drafted"] for r in final.per_example) > 0
    for report in (before, periodic):
        assert report.per_example == final.per_example
        assert {k: report.metrics[k] for k in (C.ALPHA_TOK, C.ALPHA_EXPECTED, C.NUM_DRAFTED)} == \
            {k: final.metrics[k] for k in (C.ALPHA_TOK, C.ALPHA_EXPECTED, C.NUM_DRAFTED)}
    assert (check["alpha_tok"], check["alpha_expected"]) == (final.metrics[C.ALPHA_TOK], final.metrics[C.ALPHA_EXPECTED])
    assert check["per_prompt"]["drafted"] == [final.per_example[i]["num_drafted"] for i in range(len(prompts))]
    assert C.SPEEDUP in final.metrics and C.SPEEDUP not in before.metrics  # the final one was timed
    logger.finalize("success")
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get(C.ALPHA_TOK)]
    assert [(int(r["step"]), float(r[C.ALPHA_TOK])) for r in rows] == [(7, final.metrics[C.ALPHA_TOK])]
