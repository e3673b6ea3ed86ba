"""The bench's latency histogram: buckets are contiguous, percentiles stay within 1/64 of exact."""

from __future__ import annotations

import math
import random

import pytest

from bench import histogram
from bench.histogram import LatencyHistogram


def exact_percentile(samples: list[int], percent: float) -> int:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


def test_buckets_are_contiguous_and_hold_their_values() -> None:
    previous_high = -1
    for index in range(0, 2000):
        low, high = histogram.bucket_bounds(index)
        assert low == previous_high + 1
        assert histogram.bucket_of(low) == index
        assert histogram.bucket_of(high) == index
        previous_high = high


def test_small_values_are_exact() -> None:
    hist = LatencyHistogram()
    for value in (1, 2, 3, 50, 100, 127):
        hist.record_us(value)
    assert hist.percentile_us(0) == 1
    assert hist.percentile_us(50) == 3
    assert hist.percentile_us(100) == 127


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_within_relative_error_of_exact(seed: int) -> None:
    rng = random.Random(seed)
    samples = [max(1, int(rng.lognormvariate(8, 1.2))) for _ in range(20_000)]  # ~3 ms, long tail
    hist = LatencyHistogram()
    for value in samples:
        hist.record_us(value)
    for percent in (1, 50, 90, 99, 99.9, 100):
        exact = exact_percentile(samples, percent)
        assert abs(hist.percentile_us(percent) - exact) <= exact / histogram.SUB_BUCKETS + 1


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(7)
    samples = [rng.randint(1, 5_000_000) for _ in range(5000)]
    one, left, right = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for i, value in enumerate(samples):
        one.record_us(value)
        (left if i % 2 else right).record_us(value)
    left.merge(right)
    assert left.counts == one.counts
    assert (left.count, left.min_us, left.max_us, left.total_us) == (one.count, one.min_us, one.max_us,
                                                                     one.total_us)
    assert left.summary() == one.summary()


def test_empty_histogram_has_no_percentiles() -> None:
    with pytest.raises(ValueError):
        LatencyHistogram().percentile_us(50)
    assert LatencyHistogram().summary() == {"count": 0}
