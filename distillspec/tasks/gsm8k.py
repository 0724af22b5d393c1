"""GSM8K grade-school math (low-entropy reasoning): accuracy on the extracted final number.

Records: `question`, `answer` (worked solution ending in `#### <number>`). reference = that number;
target_text = the worked solution with calculator annotations (<<9*2=18>>) removed.
"""

from __future__ import annotations

from typing import Sequence

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.tasks.base import DatasetTask, strip_calculator
from distillspec.tasks.metrics import accuracy, has_answer_marker

MATH_INSTRUCTION = ("{input}\n\nSolve the problem step by step. End your answer with a final line of the "
                    "form '#### <number>'.")


class MathAnswerMixin:
    """Quality = accuracy of the final number (see `distillspec.tasks.metrics.extract_answer`)."""

    quality_metrics = (C.ACCURACY,)
    instruction = MATH_INSTRUCTION
    answer_prefix = "\nAnswer:"

    def compute_quality(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return {C.ACCURACY: accuracy(predictions, references)}

    @staticmethod
    def has_final_answer(text: str) -> bool:
        """Whether `text` holds the requested final-answer line ('#### <number>' or \\boxed{<number>})."""
        return has_answer_marker(text)


class GSM8KTask(MathAnswerMixin, DatasetTask):
    name = "gsm8k"
    hf_id = "openai/gsm8k"
    offline_hint = "task=gsm8k_local (GSM8K from ../shared/data)"
    hf_config = "main"
    train_split = "train"
    eval_split = "test"
    input_field = "question"
    output_field = "answer"
    default_max_new_tokens = 312
    default_max_prompt_tokens = 512

    def reference_of(self, output: str) -> str:
        """The text after the last '####' (e.g. '1,234'); every GSM8K answer has one."""
        if "####" not in output:
            raise ConfigError(f"task {self.name!r}: answer without a '#### <number>' line: {output[-80:]!r}")
        return output.rsplit("####", 1)[1].strip()

    def target_of(self, output: str) -> str:
        return strip_calculator(output)
