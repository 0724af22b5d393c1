"""Strict JSON for results: non-finite floats (NaN, inf) become null, so every file we write parses with any
standard JSON reader (Python's json.dumps would write bare NaN / Infinity, which is not JSON).

Plain Python (numpy / torch scalars and 0-d tensors are converted by duck typing, nothing is imported).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def to_strict(obj: Any) -> Any:
    """A copy of `obj` with tuples as lists, numpy / torch scalars as Python numbers and non-finite floats as
    None. Raises TypeError for objects JSON cannot represent."""
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): to_strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors (0-d ones give a Python number)
        return to_strict(obj.tolist())
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r:.80} as JSON")


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `to_strict(obj)` with allow_nan=False (a non-finite float can never slip through)."""
    return json.dumps(to_strict(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: Path, data: Any, **kwargs: Any) -> None:
    """Strict JSON (indent 2) via a temp file and rename, so a reader never sees a half-written file."""
    path = Path(path)
    text = dumps(data, indent=kwargs.pop("indent", 2), **kwargs)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
