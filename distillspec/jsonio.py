"""Strict JSON for results: non-finite floats (NaN, inf) become null, so every file we write parses with any
standard JSON reader (Python's json.dumps would write bare NaN / Infinity, which is not JSON).

`read_json` reads one back, naming a damaged file in one line (DamagedFileError) instead of a bare
JSONDecodeError. Plain Python (numpy / torch scalars and 0-d tensors are converted by duck typing, nothing is
imported).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distillspec.errors import ConfigError


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


class DamagedFileError(ConfigError):
    """A result or config file that exists but is not valid JSON (damaged from outside: ours are written
    atomically). Its message is one line naming the file and what to do."""


def read_json(path: Path, what: str = "", fix: str = "") -> Any:
    """The parsed JSON of `path`. A file that is not valid JSON (truncated, overwritten, not UTF-8) raises
    DamagedFileError: "<path> (<what>) is damaged: not valid JSON (<reason>); <fix>". A missing file raises
    FileNotFoundError as usual."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = (f"{exc.msg}: line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError)
                  else f"undecodable bytes at byte {exc.start}")
        if not data.strip():
            reason = "the file is empty"
        raise DamagedFileError(f"{path}{f' ({what})' if what else ''} is damaged: not valid JSON ({reason})"
                               + (f"; {fix}" if fix else "")) from None
