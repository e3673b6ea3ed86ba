"""The load generator: asyncio workers over httpx, bounded by request count AND by duration.

An *operation* is one unit of work (a read, a search, a note set of three creates) given its
sequence number, returning the HTTP status that decides success. Latency is measured per
operation; throughput is successful operations over the wall time of the timed phase. Only
loopback URLs are allowed: this measures the stack on this machine, never anything remote.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from bench.histogram import LatencyHistogram

Operation = Callable[[int], Awaitable[int]]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Bounds:
    concurrency: int
    max_requests: int
    max_seconds: float
    warmup: int = 0


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    statuses: Counter[str] = field(default_factory=Counter)
    stopped_by: str = ""  # "requests" or "duration"
    driver_cpu_s: float = 0.0  # CPU the load generator itself used: it shares the machine

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def merge(self, other: LoadResult) -> None:
        """Rounds of the same side are pooled: counts and time add, histograms merge."""
        self.ok += other.ok
        self.failed += other.failed
        self.elapsed_s += other.elapsed_s
        self.driver_cpu_s += other.driver_cpu_s
        self.histogram.merge(other.histogram)
        self.statuses.update(other.statuses)
        self.stopped_by = ",".join(sorted({*self.stopped_by.split(","), other.stopped_by} - {""}))

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok, "failed": self.failed, "elapsed_s": round(self.elapsed_s, 3),
            "throughput_per_s": round(self.throughput, 2), "statuses": dict(self.statuses),
            "stopped_by": self.stopped_by, "latency": self.histogram.summary(),
            "driver_cpu_s": round(self.driver_cpu_s, 2),
        }


def require_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the load generator only speaks to loopback addresses, not {host!r}")
    return url


def loopback_client(base_url: str, *, concurrency: int, timeout: float = 60.0,
                    headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """One keep-alive connection per worker; no proxies from the environment."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=require_loopback(base_url), limits=limits, timeout=timeout,
                             headers=headers or {}, trust_env=False)


async def drive(operation: Operation, bounds: Bounds, *, expect: frozenset[int] = frozenset({200}),
                first: int = 0) -> LoadResult:
    """Run `operation` from `bounds.concurrency` workers until `max_requests` operations have
    started or `max_seconds` have passed, whichever comes first. Warm-up operations run before
    and are not recorded. Returns what the timed phase did."""
    sequence = itertools.count(first)
    if bounds.warmup:  # connections open, caches fill; bounded to a quarter of the timed phase
        await _phase(operation, sequence,
                     Bounds(bounds.concurrency, bounds.warmup, bounds.max_seconds / 4), expect, LoadResult())
    result = LoadResult()
    await _phase(operation, sequence, bounds, expect, result)
    return result


async def _phase(operation: Operation, sequence: itertools.count[int], bounds: Bounds,
                 expect: frozenset[int], result: LoadResult) -> None:
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + bounds.max_seconds
    budget = itertools.count()
    stop_reason: list[str] = []

    async def worker() -> None:
        while True:
            if next(budget) >= bounds.max_requests:
                stop_reason.append("requests")
                return
            if time.perf_counter() >= deadline:
                stop_reason.append("duration")
                return
            n = next(sequence)
            t0 = time.perf_counter()
            try:
                status = await operation(n)
            except httpx.HTTPError as exc:
                result.failed += 1
                result.statuses[type(exc).__name__] += 1
                continue
            result.histogram.record_seconds(time.perf_counter() - t0)
            result.statuses[str(status)] += 1
            if status in expect:
                result.ok += 1
            else:
                result.failed += 1

    await asyncio.gather(*(worker() for _ in range(max(1, bounds.concurrency))))
    result.elapsed_s = time.perf_counter() - started
    result.driver_cpu_s = time.process_time() - cpu_started
    result.stopped_by = "duration" if "duration" in stop_reason else "requests"
