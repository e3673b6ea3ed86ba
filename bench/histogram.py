"""Latency histogram with HDR-style log-linear buckets: exact below 128 µs, then 64 linear
sub-buckets per power of two, so any percentile is within 1/64 (1.6 %) of the true sample.

Values are recorded in integer microseconds. Memory grows with the number of distinct buckets
used (a few hundred at most), never with the number of samples, so a long run costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SUB_BUCKET_BITS = 6
SUB_BUCKETS = 1 << SUB_BUCKET_BITS  # linear steps per power of two


def bucket_of(value: int) -> int:
    """Index of the bucket holding `value` (µs). Buckets are contiguous and ordered by value."""
    if value < 2 * SUB_BUCKETS:
        return max(value, 0)
    exponent = value.bit_length() - 1  # value in [2^e, 2^(e+1))
    shift = exponent - SUB_BUCKET_BITS
    return ((shift + 1) << SUB_BUCKET_BITS) + (value >> shift) - SUB_BUCKETS


def bucket_bounds(index: int) -> tuple[int, int]:
    """[lowest, highest] value (µs) that lands in bucket `index`."""
    if index < 2 * SUB_BUCKETS:
        return index, index
    group, sub = index >> SUB_BUCKET_BITS, index & (SUB_BUCKETS - 1)
    shift = group - 1
    low = (SUB_BUCKETS + sub) << shift
    return low, low + (1 << shift) - 1


@dataclass
class LatencyHistogram:
    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total_us: int = 0
    min_us: int | None = None
    max_us: int = 0

    def record_seconds(self, seconds: float) -> None:
        self.record_us(max(1, round(seconds * 1_000_000)))

    def record_us(self, value: int) -> None:
        index = bucket_of(value)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total_us += value
        self.min_us = value if self.min_us is None else min(self.min_us, value)
        self.max_us = max(self.max_us, value)

    def merge(self, other: LatencyHistogram) -> None:
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.count += other.count
        self.total_us += other.total_us
        if other.min_us is not None:
            self.min_us = other.min_us if self.min_us is None else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)

    def percentile_us(self, percent: float) -> int:
        """Nearest-rank percentile, reported as the highest value of its bucket (as HdrHistogram
        does), clamped to the recorded min/max."""
        if self.count == 0:
            raise ValueError("no samples recorded")
        if not 0 <= percent <= 100:
            raise ValueError("percent must be within [0, 100]")
        rank = max(1, math.ceil(percent / 100 * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                high = bucket_bounds(index)[1]
                return min(max(high, self.min_us or 0), self.max_us)
        return self.max_us

    def percentile_ms(self, percent: float) -> float:
        return self.percentile_us(percent) / 1000

    @property
    def mean_ms(self) -> float:
        return self.total_us / self.count / 1000 if self.count else 0.0

    def summary(self) -> dict[str, float | int]:
        """Milliseconds, for result files and tables."""
        if self.count == 0:
            return {"count": 0}
        return {
            "count": self.count,
            "min_ms": (self.min_us or 0) / 1000,
            "p50_ms": self.percentile_ms(50),
            "p90_ms": self.percentile_ms(90),
            "p99_ms": self.percentile_ms(99),
            "max_ms": self.max_us / 1000,
            "mean_ms": round(self.mean_ms, 3),
        }
