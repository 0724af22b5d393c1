"""Tasks: prompt sources, formatting, length filter, generation budget and quality metric.

Hydra configs (conf/task/) name the task class in `_target_`.
"""

from __future__ import annotations

from distillspec.tasks.arithmetic import ArithmeticTask
from distillspec.tasks.base import DatasetTask, Example, PromptBatchItem, Task
from distillspec.tasks.gsm8k import GSM8KTask
from distillspec.tasks.specbench import SpecBenchTask
from distillspec.tasks.summarization import CNNDMTask, DialogSumTask, XSumTask

__all__ = ["Task", "DatasetTask", "Example", "PromptBatchItem", "ArithmeticTask",
           "GSM8KTask", "SpecBenchTask", "CNNDMTask", "XSumTask", "DialogSumTask"]
