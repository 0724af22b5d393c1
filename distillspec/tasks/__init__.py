"""Tasks: prompt sources, formatting, length filter, generation budget and quality metric.

`TASKS` maps a task name to its class; Hydra configs use `_target_` to the class directly.
"""

from __future__ import annotations

from distillspec.errors import ConfigError
from distillspec.tasks.arithmetic import ArithmeticTask
from distillspec.tasks.base import DatasetTask, Example, PromptBatchItem, Task
from distillspec.tasks.gsm8k import GSM8KTask
from distillspec.tasks.specbench import SpecBenchTask
from distillspec.tasks.summarization import CNNDMTask, DialogSumTask, XSumTask

TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8KTask,
    "cnn_dm": CNNDMTask,
    "xsum": XSumTask,
    "dialogsum": DialogSumTask,
    "specbench": SpecBenchTask,
    "arithmetic": ArithmeticTask,
}


def get_task_class(name: str) -> type[Task]:
    """The task class registered under `name`; ConfigError listing the valid names otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid choices: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "get_task_class", "Task", "DatasetTask", "Example", "PromptBatchItem", "ArithmeticTask",
           "GSM8KTask", "SpecBenchTask", "CNNDMTask", "XSumTask", "DialogSumTask"]
