"""Task quality metrics: final-number accuracy (GSM8K style) and ROUGE.

Pure Python: no torch, Lightning or Hydra. Every metric returns a mean over examples in [0, 1]
(ROUGE too: the F-measure as a fraction, not x100, so all quality numbers share one scale).

Answer extraction (`extract_answer`), in order of preference:
  1. the LAST `#### <number>` or `\\boxed{<number>}` marker in the text (whichever comes last);
  2. otherwise the last number anywhere in the text (documented fallback: models that do not follow
     the answer format still get credit when their final number is right, as in common GSM8K harnesses);
  3. otherwise None (no number at all), which never matches a reference.
Numbers may carry `$`, thousands commas, a sign, decimals and a trailing period: `$1,234.50.` -> 1234.5.
Comparison is numeric, so `5`, `5.0` and `$5.00` are equal.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from distillspec import constants as C
from distillspec.errors import ConfigError

# A number: optional sign and `$` (either order), digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])([-+]?)\$?([-+]?)(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?(?!\w)")
_HASH_MARKER = re.compile(r"####\s*((?:(?!####)[^\n])*)")
_BOXED_MARKER = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ROUGE_TYPES = (C.ROUGE1, C.ROUGE2, C.ROUGEL)


def _numbers(text: str) -> list[float]:
    """All numbers in `text`, in order of appearance."""
    out = []
    for m in _NUMBER.finditer(text):
        sign1, sign2, whole, frac = m.groups()
        if whole is None and frac is None:
            continue
        value = float((whole or "0").replace(",", "") + (frac or ""))
        if "-" in (sign1 + sign2):
            value = -value
        out.append(value)
    return out


def parse_number(text: str) -> float | None:
    """The first number in `text` (e.g. a marker's contents), or None."""
    nums = _numbers(text)
    return nums[0] if nums else None


def extract_answer(text: str) -> float | None:
    """The model's final numeric answer in `text` (see the module docstring for the rules), or None."""
    markers = [(m.start(), m.group(1)) for m in _HASH_MARKER.finditer(text)]
    markers += [(m.start(), m.group(1)) for m in _BOXED_MARKER.finditer(text)]
    for _, content in sorted(markers, reverse=True):
        value = parse_number(content)
        if value is not None:
            return value
    nums = _numbers(text)
    return nums[-1] if nums else None


def has_answer_marker(text: str) -> bool:
    """Whether `text` has a `#### <number>` or `\\boxed{<number>}` marker (a final answer was written)."""
    contents = [m.group(1) for m in _HASH_MARKER.finditer(text)] + [m.group(1) for m in _BOXED_MARKER.finditer(text)]
    return any(parse_number(c) is not None for c in contents)


def answers_match(prediction: str, reference: str) -> bool:
    """Whether the numbers extracted from `prediction` and `reference` are equal (numeric compare)."""
    pred, ref = extract_answer(prediction), extract_answer(reference)
    if pred is None or ref is None:
        return False
    return math.isclose(pred, ref, rel_tol=1e-9, abs_tol=1e-9)


def _check_pairs(predictions: Sequence[str], references: Sequence[str | None]) -> None:
    if len(predictions) != len(references):
        raise ConfigError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ConfigError("cannot score an empty list of predictions")
    if any(r is None for r in references):
        raise ConfigError("scoring needs a reference for every prediction; some references are None")


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose extracted final number equals the reference's."""
    _check_pairs(predictions, references)
    return sum(answers_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in [0, 1] (rouge-score, Porter stemming on), keyed rouge1/rouge2/rougeL."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for key in _ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}
