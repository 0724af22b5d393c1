"""Spec-Bench, the standard speculative-decoding benchmark (local question.jsonl; evaluation only).

Records: `question_id`, `category`, `turns` (user turns; only turns[0] is used: single-turn prompts),
optional `reference` (list, one per turn; reference = reference[0]). `categories` selects categories
(None = all); an unknown one raises ConfigError listing those present in the file.

Quality is not defined for most categories (open-ended chat, translation, RAG...), so by default the
task has no quality metric and `score` returns {}. The one exception: when the selection is exactly
["math_reasoning"] (GSM8K questions with worked references), quality = accuracy on the final number.
Spec-Bench has no train split: load("train") needs an explicit `train_path` in the same format.
"""

from __future__ import annotations

from typing import Any, Sequence

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.tasks.base import Example, Task, read_records
from distillspec.tasks.gsm8k import MATH_INSTRUCTION
from distillspec.tasks.metrics import accuracy

MATH_CATEGORY = "math_reasoning"


class SpecBenchTask(Task):
    """Args (besides Task's): path: question.jsonl. categories: list of category names or None (all).
    train_path: optional file in the same format for load("train")."""

    name = "specbench"
    default_max_new_tokens = 128
    default_max_prompt_tokens = 1024

    def __init__(self, *, path: str, categories: Sequence[str] | str | None = None,
                 train_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path, self.train_path = path, train_path
        self.categories = [categories] if isinstance(categories, str) else (
            None if categories is None else list(categories))
        self._rows = read_records(path)  # small (480 rows): read now so bad categories fail early
        present = sorted({str(r.get("category")) for r in self._rows})
        if self.categories is not None:
            unknown = [c for c in self.categories if c not in present]
            if unknown or not self.categories:
                raise ConfigError(f"unknown specbench categories {unknown or self.categories!r}; "
                                  f"categories in {path!r}: {', '.join(present)}")
        self.is_math = self.categories == [MATH_CATEGORY]
        if self.is_math:
            self.quality_metrics = (C.ACCURACY,)
            if kwargs.get("instruction") is None:
                self.instruction = MATH_INSTRUCTION

    def _load(self, split: str) -> list[Example]:
        if split == "train":
            if self.train_path is None:
                raise ConfigError("task 'specbench' is an evaluation benchmark with no train split: use "
                                  "stage=eval, or set task.train_path to a file in the same format")
            rows = read_records(self.train_path)
        else:
            rows = self._rows
        keep = None if self.categories is None else set(self.categories)
        out = []
        for i, r in enumerate(rows):
            if keep is not None and r.get("category") not in keep:
                continue
            if not r.get("turns"):
                raise ConfigError(f"specbench record {i} (question_id {r.get('question_id')!r}) has no turns")
            refs = r.get("reference") or [None]
            out.append(Example(uid=f"{self.name}/{split}/{r.get('question_id', i)}", prompt=str(r["turns"][0]),
                               reference=None if refs[0] is None else str(refs[0]), target_text=None,
                               meta={"split": split, "category": r.get("category")}))
        return out

    def compute_quality(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return {C.ACCURACY: accuracy(predictions, references)}
