"""The bench's load generator: both bounds hold, failures are counted, only loopback is allowed.
No wall-time assertions: the operations here take no time worth measuring."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bench import load


async def test_request_bound_stops_after_exactly_that_many_operations() -> None:
    seen: list[int] = []

    async def operation(n: int) -> int:
        seen.append(n)
        await asyncio.sleep(0)
        return 200

    result = await load.drive(operation, load.Bounds(concurrency=4, max_requests=25, max_seconds=60,
                                                     warmup=5))
    assert len(seen) == 30  # 5 warm-up + 25 timed, numbered without gaps
    assert sorted(seen) == list(range(30))
    assert (result.ok, result.failed, result.stopped_by) == (25, 0, "requests")
    assert result.histogram.count == 25


async def test_duration_bound_stops_an_unbounded_request_count() -> None:
    async def operation(n: int) -> int:
        await asyncio.sleep(0.001)
        return 200

    result = await load.drive(operation, load.Bounds(concurrency=2, max_requests=10**9, max_seconds=0.05))
    assert result.stopped_by == "duration"
    assert 0 < result.ok < 10**9


async def test_unexpected_statuses_and_transport_errors_are_failures() -> None:
    async def operation(n: int) -> int:
        if n % 3 == 0:
            raise httpx.ConnectError("refused")
        return 200 if n % 3 == 1 else 503

    result = await load.drive(operation, load.Bounds(concurrency=1, max_requests=9, max_seconds=60))
    assert (result.ok, result.failed) == (3, 6)
    assert result.statuses == {"ConnectError": 3, "200": 3, "503": 3}


def test_merged_rounds_add_up() -> None:
    a, b = load.LoadResult(ok=10, elapsed_s=2.0), load.LoadResult(ok=30, elapsed_s=2.0)
    a.histogram.record_us(1000)
    b.histogram.record_us(3000)
    a.merge(b)
    assert (a.ok, a.elapsed_s, a.throughput, a.histogram.count) == (40, 4.0, 10.0, 2)


@pytest.mark.parametrize("url", ["http://example.org/fhir", "http://10.0.0.5:8000"])
def test_only_loopback_targets(url: str) -> None:
    with pytest.raises(ValueError):
        load.require_loopback(url)
    assert load.require_loopback("http://127.0.0.1:8000/fhir")
