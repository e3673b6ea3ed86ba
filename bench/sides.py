"""Side-by-side comparison: the same operation against two targets, rounds alternating A B A B
(then B A B A) so a change in background load during the run hits both sides alike."""

from __future__ import annotations

from collections.abc import Callable

from bench import load
from bench.plan import Plan

MakeOperation = Callable[[str], load.Operation]  # side name -> operation


async def compare(sides: list[str], make: MakeOperation, plan: Plan, *,
                  expect: frozenset[int] = frozenset({200}), seconds: float | None = None,
                  concurrency: int | None = None) -> dict[str, load.LoadResult]:
    pooled = {side: load.LoadResult() for side in sides}
    operations = {side: make(side) for side in sides}
    bounds = load.Bounds(concurrency=concurrency or plan.concurrency, max_requests=plan.max_requests,
                         max_seconds=seconds or plan.seconds, warmup=plan.warmup)
    for round_no in range(plan.rounds):
        order = sides if round_no % 2 == 0 else list(reversed(sides))
        for side in order:
            result = await load.drive(operations[side], bounds, expect=expect)
            pooled[side].merge(result)
    return pooled


def describe(result: load.LoadResult) -> str:
    lat = result.histogram
    if lat.count == 0:
        return f"{result.throughput:.0f}/s (no successful samples; statuses {dict(result.statuses)})"
    failed = f", {result.failed} failed {dict(result.statuses)}" if result.failed else ""
    return (f"{result.throughput:.0f}/s, p50 {lat.percentile_ms(50):.1f} ms, "
            f"p99 {lat.percentile_ms(99):.1f} ms{failed}")
