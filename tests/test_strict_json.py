"""Results are written as strict JSON (non-finite floats become null), never bare NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch


def _strict_load(text: str):
    def refuse(const):
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_atomic_turns_non_finite_floats_into_null(tmp_path):
    from distillspec.runner import write_json_atomic

    data = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": np.float32("nan"), "e": np.float64(2.5)},
            "t": torch.tensor(float("nan")), "n": np.int64(3), "ok": 0.5, "tup": (math.nan, 1)}
    write_json_atomic(tmp_path / "m.json", data)
    back = _strict_load((tmp_path / "m.json").read_text())
    assert back == {"a": None, "b": [1.0, None, None], "c": {"d": None, "e": 2.5}, "t": None, "n": 3, "ok": 0.5,
                    "tup": [None, 1]}


def test_dumps_refuses_what_it_cannot_represent():
    from distillspec.jsonio import dumps

    assert _strict_load(dumps({"x": float("nan")})) == {"x": None}
    with pytest.raises(TypeError):
        dumps({"x": object()})
