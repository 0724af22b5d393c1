"""Project exception types. Bad input fails early, naming the bad value and the valid choices."""

from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
    """A user-facing configuration or input error (raised before any heavy work)."""


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_range(name: str, value: float, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ConfigError unless lo <= value <= hi (open ends excluded when *_open)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{name}={value!r} is out of range; valid: {left}{lo_s}, {hi_s}{right}")
