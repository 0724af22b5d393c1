"""Project exception types. Bad input fails early, naming the bad value and the valid choices."""

from __future__ import annotations

import math
from typing import Iterable

# Positive temperatures below this are refused: logits / T overflows float32 (inf -> NaN probabilities)
# long before T reaches the float minimum, so a tiny T would silently give NaN instead of greedy decoding.
MIN_TEMPERATURE = 1e-3


class ConfigError(ValueError):
    """A user-facing configuration or input error (raised before any heavy work)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or gradient, or an update blew up the weights; nothing non-finite or
    blown-up is applied or saved (exit code 3)."""


class InvariantError(RuntimeError):
    """Numbers that cannot happen (e.g. more accepted drafted tokens than output tokens): a bug or broken input
    upstream, reported as an error instead of a silently impossible metric."""


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_number(name: str, value: object, *, integer: bool = False) -> None:
    """Raise ConfigError unless `value` is a finite real number (an int when `integer`; bools never)."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ConfigError(f"{name}={value!r} is not {kind} (got {type(value).__name__}); valid: {kind}")
    if not integer and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not finite; valid: {kind} (no nan/inf)")


def check_range(name: str, value: float, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ConfigError unless `value` is a finite number with lo <= value <= hi (open ends excluded)."""
    check_number(name, value)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{name}={value!r} is out of range; valid: {left}{lo_s}, {hi_s}{right}")


def check_temperature(name: str, value: float, *, allow_zero: bool = True) -> None:
    """Raise ConfigError unless value is 0 (greedy, when allowed) or a finite T >= MIN_TEMPERATURE."""
    check_number(name, value)
    if allow_zero and value == 0:
        return
    if not value >= MIN_TEMPERATURE:
        zero = "0 (greedy) or " if allow_zero else ""
        raise ConfigError(f"{name}={value!r} is invalid; valid: {zero}a finite temperature >= {MIN_TEMPERATURE:g} "
                          "(smaller ones overflow logits / T)")


class EngineError(RuntimeError):
    """A generation engine in another process (a vLLM server) died, did not answer, or answered wrongly; the
    message names the server and, for one this run started, its log."""
