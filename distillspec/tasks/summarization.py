"""Summarisation tasks (high entropy): CNN/DailyMail, XSum, DialogSum, scored with ROUGE-1/2/L.

ROUGE is the mean F-measure in [0, 1] (rouge-score with Porter stemming), not x100.
reference = target_text = the gold summary.
"""

from __future__ import annotations

from typing import Sequence

from distillspec import constants as C
from distillspec.tasks.base import DatasetTask
from distillspec.tasks.metrics import rouge


class SummarizationTask(DatasetTask):
    quality_metrics = (C.ROUGE1, C.ROUGE2, C.ROUGEL)
    answer_prefix = "\nSummary:"
    default_max_new_tokens = 128
    default_max_prompt_tokens = 512

    def compute_quality(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return rouge(predictions, references)


class CNNDMTask(SummarizationTask):
    name = "cnn_dm"
    hf_id = "abisee/cnn_dailymail"
    hf_config = "3.0.0"
    eval_split = "test"
    input_field = "article"
    output_field = "highlights"
    id_field = None
    instruction = "Summarize the following news article in a few sentences.\n\n{input}"


class XSumTask(SummarizationTask):
    name = "xsum"
    hf_id = "EdinburghNLP/xsum"
    hf_config = None
    eval_split = "test"
    input_field = "document"
    output_field = "summary"
    default_max_new_tokens = 64
    instruction = "Summarize the following document in one sentence.\n\n{input}"


class DialogSumTask(SummarizationTask):
    """Local files: dialogsum.{train,dev,test}.jsonl; the test file's first reference is `summary1`."""

    name = "dialogsum"
    hf_id = "knkarthick/dialogsum"
    hf_config = None
    eval_split = "test"
    input_field = "dialogue"
    output_field = ("summary", "summary1")
    id_field = ("fname", "id")  # local files / HF
    instruction = "Summarize the following dialogue.\n\n{input}"
