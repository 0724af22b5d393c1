"""Trustworthy SD speed numbers: timed rounds, their phase split, and the median round.

Pure Python/torch (no Lightning/Hydra). The evaluator times SD and target-only decoding of the same
batch in several rounds, alternating which of the two goes first (after a warm-up of both), and keeps
one `RoundTimes` per round. Rounds of all batches are summed round by round; the reported SD time and
target-only time are the median rounds' (an actual round, so its phases still sum to its total), and the
per-round speedups give the spread. Speedup, bookkeeping share, cost ratio c and verify-cost ratio v all
come from those recorded phase times (`speed_metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

from distillspec import constants as C
from distillspec.sd.metrics import speedup_metrics, verify_cost_ratio


@dataclass
class RoundTimes:
    """Seconds (and forward-call counts) of one timed round; `+` sums rounds of different batches.

    sd_*: SD wall time and its prefill / draft / target forward time (prefill = prompt forwards of both
    models; draft and target = forwards after it). base_*: target-only wall time, its prefill forward
    and its decoding-step forwards (zero when the baseline was not run).
    """

    sd_total: float = 0.0
    sd_prefill: float = 0.0
    sd_draft: float = 0.0
    sd_target: float = 0.0
    sd_draft_calls: int = 0
    sd_target_calls: int = 0
    base_total: float = 0.0
    base_prefill: float = 0.0
    base_step: float = 0.0
    base_step_calls: int = 0

    @classmethod
    def of(cls, sd, base=None) -> "RoundTimes":
        """From an SDResult and an optional target-only GenResult of the same batch."""
        out = cls(sd_total=float(sd.time_total), sd_prefill=float(sd.time_prefill), sd_draft=float(sd.time_draft),
                  sd_target=float(sd.time_target), sd_draft_calls=int(sd.num_draft_calls),
                  sd_target_calls=int(sd.num_target_calls))
        if base is not None:
            out.base_total, out.base_prefill = float(base.time_total), float(base.time_prefill)
            out.base_step = float(base.time_forward) - float(base.time_prefill)
            out.base_step_calls = max(int(base.num_calls) - 1, 0)
        return out

    def __add__(self, other: "RoundTimes") -> "RoundTimes":
        return RoundTimes(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def sd_other(self) -> float:
        """SD wall time outside model forwards (sampling, verification, cache bookkeeping)."""
        return max(0.0, self.sd_total - self.sd_prefill - self.sd_draft - self.sd_target)


def sum_rounds(per_batch: Sequence[Sequence[RoundTimes]]) -> list[RoundTimes]:
    """per_batch[b][r] -> one RoundTimes per round r, summed over batches (rounds beyond the shortest dropped)."""
    if not per_batch:
        return []
    n = min(len(rounds) for rounds in per_batch)
    return [sum((rounds[r] for rounds in per_batch), RoundTimes()) for r in range(n)]


def median_round(rounds: Sequence[RoundTimes], key: str) -> RoundTimes:
    """The round whose `key` time is the median (the lower middle one for an even count)."""
    if not rounds:
        raise ValueError("no timed rounds")
    ordered = sorted(rounds, key=lambda r: getattr(r, key))
    return ordered[(len(ordered) - 1) // 2]


def speed_metrics(rounds: Sequence[RoundTimes], tau: float, cost_ratio: float, gamma: int,
                  with_baseline: bool) -> dict[str, float]:
    """Phase split of the median SD round (the four phases sum to SD_TIME), bookkeeping = other / total,
    and with the baseline: its median round's prefill/decode, speedup = TARGET_TIME / SD_TIME with the
    min/max over rounds, v and both predicted speedups. cost_ratio: c of the same median SD round."""
    sd = median_round(rounds, "sd_total")
    out = {C.SD_TIME: sd.sd_total, C.SD_TIME_PREFILL: sd.sd_prefill, C.SD_TIME_DRAFT: sd.sd_draft,
           C.SD_TIME_TARGET: sd.sd_target, C.SD_TIME_OTHER: sd.sd_other,
           C.BOOKKEEPING_FRACTION: sd.sd_other / sd.sd_total if sd.sd_total > 0 else math.nan,
           C.SPEED_ROUNDS: float(len(rounds))}
    if with_baseline:
        base = median_round(rounds, "base_total")
        out.update({C.TARGET_TIME: base.base_total, C.TARGET_TIME_PREFILL: base.base_prefill,
                    C.TARGET_TIME_DECODE: base.base_total - base.base_prefill})
        v = verify_cost_ratio(sd.sd_target, sd.sd_target_calls, base.base_step, base.base_step_calls)
        out.update(speedup_metrics(sd.sd_total, base.base_total, tau, cost_ratio, gamma, verify_ratio=v))
        per_round = [r.base_total / r.sd_total for r in rounds if r.sd_total > 0]
        out[C.SPEEDUP_MIN] = min(per_round) if per_round else math.nan
        out[C.SPEEDUP_MAX] = max(per_round) if per_round else math.nan
    return out
