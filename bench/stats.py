"""Statistics the benchmarks share: percentiles and a p50 / p95 / max spread."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def sorted_percentile(sorted_values: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile (rank rounded up) of an already sorted, non-empty sequence: the
    relay benchmarks' latency percentiles (nanosecond samples)."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass
class Spread:
    """p50 / p95 / max of one measurement, in milliseconds (NaN when there is no sample)."""

    p50: float
    p95: float
    max: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (NaN entries ignored)."""
        kept = [v for v in values if not math.isnan(v)]
        return cls(
            percentile(kept, 50), percentile(kept, 95), max(kept, default=math.nan), len(kept)
        )

    def render(self) -> str:
        """``p50 / p95 / max`` with one decimal, or ``-`` without samples."""
        if not self.samples:
            return "-"
        return f"{self.p50:.1f} / {self.p95:.1f} / {self.max:.1f}"
